"""Architecture parameters and the distributions that turn them into samples.

α lives here, apart from the network's Keras weights, so weights and α have
their own optimizers and are checkpointed side by side (DESIGN.md). A search
space describes its decisions as *groups* (e.g. ``normal`` and ``reduce`` for
the DARTS cell space): each group is a ``[num_decisions, num_candidates]``
logits tensor, with an optional boolean mask for spaces whose decisions have
different candidate lists (the S1 space of DARTS-PT).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class DecisionGroup:
  """One group of categorical decisions sharing a candidate list.

  Attributes:
    name: group name, e.g. ``"normal"``.
    candidates: candidate names (op names), the column order of the logits.
    num_decisions: rows of the logits (edges of a cell, blocks of a net).
    mask: optional ``[num_decisions, len(candidates)]`` booleans; False marks
      a candidate that decision does not offer.
  """
  name: str
  candidates: tuple[str, ...]
  num_decisions: int
  mask: tuple[tuple[bool, ...], ...] | None = None

  def mask_array(self) -> np.ndarray:
    if self.mask is None:
      return np.ones((self.num_decisions, len(self.candidates)), bool)
    return np.asarray(self.mask, bool)


class ArchParams(tf.Module):
  """The architecture logits α, one variable per decision group.

  Create it inside ``strategy.scope()`` so the variables are mirrored.

  Args:
    groups: the space's decision groups.
    init_scale: α is initialised as ``init_scale * N(0, 1)`` (DARTS uses
      1e-3); 0 gives uniform logits.
    seed: seed of the initialisation.
  """

  def __init__(self, groups: Sequence[DecisionGroup], init_scale: float = 1e-3,
               seed: int = 0, dtype=tf.float32, name: str = "arch"):
    super().__init__(name=name)
    self.groups = tuple(groups)
    rng = np.random.default_rng(seed)
    self.logits = {}
    for group in self.groups:
      shape = (group.num_decisions, len(group.candidates))
      init = init_scale * rng.standard_normal(shape)
      self.logits[group.name] = tf.Variable(
          tf.constant(init, dtype), name=f"alpha_{group.name}")
    self._masks = {g.name: tf.constant(g.mask_array()) for g in self.groups}

  @property
  def group_names(self) -> tuple[str, ...]:
    return tuple(g.name for g in self.groups)

  @property
  def variables_list(self) -> list[tf.Variable]:
    """The α variables in group order (what the α optimizer updates)."""
    return [self.logits[g.name] for g in self.groups]

  def group(self, name: str) -> DecisionGroup:
    for g in self.groups:
      if g.name == name:
        return g
    raise KeyError(f"unknown decision group {name!r}; have {self.group_names}")

  def masked_logits(self, name: str) -> tf.Tensor:
    """Logits with unavailable candidates set to -inf."""
    logits = tf.convert_to_tensor(self.logits[name])
    return tf.where(self._masks[name], logits,
                    tf.constant(-np.inf, logits.dtype))

  def probabilities(self, name: str) -> tf.Tensor:
    return tf.nn.softmax(self.masked_logits(name), axis=-1)

  def entropy(self, name: str) -> tf.Tensor:
    """Mean entropy (nats) of the decisions of one group."""
    p = self.probabilities(name)
    return tf.reduce_mean(-tf.reduce_sum(tf.math.xlogy(p, p), axis=-1))

  def numpy(self) -> dict[str, np.ndarray]:
    return {name: v.numpy() for name, v in self.logits.items()}

  def assign(self, values: Mapping[str, np.ndarray]) -> None:
    for name, value in values.items():
      self.logits[name].assign(value)


class ArchDistribution:
  """How an architecture sample is drawn from α.

  ``sample`` runs inside the gradient tape, so a reparameterised sample
  carries gradients to α. It returns a mapping group name → weights of shape
  ``[num_decisions, num_candidates]`` that the supernet mixes with.
  """

  #: True when the sample is one-hot and only the chosen ops need to run.
  single_path = False

  def sample(self, arch: ArchParams, step=None) -> dict[str, tf.Tensor]:
    raise NotImplementedError


class SoftmaxDistribution(ArchDistribution):
  """DARTS: the deterministic continuous relaxation softmax(α)."""

  def sample(self, arch: ArchParams, step=None) -> dict[str, tf.Tensor]:
    return {name: arch.probabilities(name) for name in arch.group_names}
