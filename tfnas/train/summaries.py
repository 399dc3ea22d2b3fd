"""TensorBoard summaries of a search: metrics and the architecture state."""

from __future__ import annotations

import time
from typing import Mapping

import numpy as np
import tensorflow as tf
from tensorflow.core.util import event_pb2
# tf.summary has no public call that writes a whole Event; this one is what
# TF's own compat.v1 FileWriter uses on a TF2 summary file.
from tensorflow.python.ops import summary_ops_v2

from tfnas.arch import ArchParams


class LazyFileWriter:
  """A summary file writer whose event file is created by the first write:
  a run that writes nothing (a finished run resumed, an evaluation) adds no
  empty event file to its ``tb/`` folder.

  The new file opens with a ``SessionLog.START`` event at ``start_step``
  (the first step this process runs: one past the restored checkpoint's).
  TensorBoard drops the events an earlier process wrote at that step or
  later, so the steps a resumed run repeats (those after its checkpoint,
  or after an older one when the newest could not be read) are shown once,
  with their new values. TensorBoard's fast loader does this by itself; the
  event does it for ``--load_fast=false`` and `EventAccumulator` readers.
  """

  def __init__(self, logdir: str, start_step: int = 0):
    self._logdir = logdir
    self._start_step = int(start_step)
    self._writer = None

  def as_default(self, step=None):
    if self._writer is None:
      self._writer = tf.summary.create_file_writer(self._logdir)
      with self._writer.as_default():
        _write_session_start(self._start_step)
    return self._writer.as_default(step=step)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()


def _write_session_start(step: int) -> None:
  event = event_pb2.Event(step=step, wall_time=time.time())
  event.session_log.status = event_pb2.SessionLog.START
  summary_ops_v2.import_event(tf.constant(event.SerializeToString()))


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
