"""TensorBoard summaries of a search: metrics and the architecture state."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import tensorflow as tf

from tfnas.arch import ArchParams


class LazyFileWriter:
  """A summary file writer whose event file is created by the first write:
  a run that writes nothing (a finished run resumed, an evaluation) adds no
  empty event file to its ``tb/`` folder."""

  def __init__(self, logdir: str):
    self._logdir = logdir
    self._writer = None

  def as_default(self, step=None):
    if self._writer is None:
      self._writer = tf.summary.create_file_writer(self._logdir)
    return self._writer.as_default(step=step)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()


def write_scalars(writer, values: Mapping[str, float], step: int) -> None:
  with writer.as_default(step=step):
    for tag, value in values.items():
      tf.summary.scalar(tag, value)


def write_arch(writer, arch: ArchParams, step: int, genotype=None,
               fixed=None) -> None:
  """softmax(α) per edge per op, entropies, and the genotype as text.

  Tags: ``arch/<group>/<decision>_<e>/<op>`` (decision: ``edge`` of a
  cell, ``block`` of a single-path network), ``arch/<group>/entropy`` and
  ``arch/entropy`` (mean over groups), ``arch/genotype``. With ``fixed``
  (group → ``[E]`` fixed choice or -1, from progressive early stop):
  ``arch/<group>/<decision>_<e>/fixed`` (the fixed index, -1 while sampled),
  ``arch/<group>/fixed`` (count) and ``arch/fixed`` as text.
  """
  with writer.as_default(step=step):
    entropies = []
    for group in arch.groups:
      probs = arch.probabilities(group.name).numpy()
      mask = group.mask_array()
      for e in range(group.num_decisions):
        for k, op in enumerate(group.candidates):
          if mask[e, k]:
            tf.summary.scalar(f"arch/{group.name}/{group.decision}_{e}/{op}",
                              probs[e, k])
      entropy = float(arch.entropy(group.name).numpy())
      entropies.append(entropy)
      tf.summary.scalar(f"arch/{group.name}/entropy", entropy)
    tf.summary.scalar("arch/entropy", float(np.mean(entropies)))
    if fixed is not None:
      lines = []
      for group in arch.groups:
        f = np.asarray(fixed[group.name])
        for e, k in enumerate(f):
          tf.summary.scalar(f"arch/{group.name}/{group.decision}_{e}/fixed",
                            float(k))
          if k >= 0:
            lines.append(f"    {group.name} {group.decision} {e:2d}: "
                         f"{group.candidates[k]}")
        tf.summary.scalar(f"arch/{group.name}/fixed", float((f >= 0).sum()))
      tf.summary.text("arch/fixed",
                      "\n".join(lines) or "no decision fixed yet")
    if genotype is not None:
      # Markdown code block keeps the alignment in TensorBoard's text tab.
      text = "\n".join("    " + line for line in str(genotype).splitlines())
      tf.summary.text("arch/genotype", text)
