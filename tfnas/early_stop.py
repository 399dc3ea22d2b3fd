"""Progressive early stop of architecture decisions (DSNAS section 3.5).

Eq. 8: once, on a decision (a block or an edge), the largest α exceeds every
other by at least ``h``, its choice is fixed to that argmax: it is no longer
sampled and its α no longer changes. ``on_logits=False`` (the default)
compares softmax probabilities instead of logits (h = 0.3 then means "the
favourite is 30 points of probability ahead of the runner-up").

The fixed choices and the α rows they froze are variables, checkpointed with
the run, so a resumed search keeps them.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfnas.arch import ArchParams


def decision_gaps(arch: ArchParams, on_logits: bool = False
                  ) -> dict[str, np.ndarray]:
  """Group → ``[E]`` gap between the best and second-best candidate.

  Candidates a decision does not offer are ignored; a decision with a
  single candidate has an infinite gap.
  """
  out = {}
  for group in arch.groups:
    mask = group.mask_array()
    if on_logits:
      values = arch.logits[group.name].numpy()
    else:
      values = arch.probabilities(group.name).numpy()
    values = np.where(mask, values, -np.inf)
    top2 = -np.sort(-values, axis=-1)[:, :2]
    if top2.shape[1] < 2:
      out[group.name] = np.full(len(values), np.inf)
    else:
      with np.errstate(invalid="ignore"):
        out[group.name] = np.where(np.isfinite(top2[:, 1]),
                                   top2[:, 0] - top2[:, 1], np.inf)
  return out


def remaining_children(arch: ArchParams,
                       fixed: dict[str, np.ndarray] | None = None) -> int:
  """How many children can still be drawn: the product, over the decisions
  not fixed (``fixed`` as `ProgressiveEarlyStop.fixed`), of the number of
  candidates each offers; 1 once every decision is fixed."""
  count = 1
  for group in arch.groups:
    offered = group.mask_array().sum(axis=-1)
    if fixed is not None and group.name in fixed:
      offered = offered[np.asarray(fixed[group.name]) < 0]
    for n in offered:
      count *= int(n)
  return count


class ProgressiveEarlyStop(tf.Module):
  """Fixed decisions of a search and the policy that fixes them.

  Create inside ``strategy.scope()``. The loop calls `check` (every epoch,
  or every N steps); a single-path estimator reads `fixed` when sampling,
  masks α-gradients with `mask_gradients` and calls `restore_fixed` after
  the α update (an optimizer with momentum or weight decay would otherwise
  keep moving a row whose gradient is zero).

  Args:
    arch: the α object.
    threshold: h of eq. 8.
    on_logits: compare logits (eq. 8 as printed) instead of probabilities.
  """

  def __init__(self, arch: ArchParams, threshold: float = 0.3,
               on_logits: bool = False, name: str = "early_stop"):
    super().__init__(name=name)
    if threshold <= 0:
      raise ValueError(f"early-stop threshold must be > 0, got {threshold}")
    self.arch = arch
    self.threshold = float(threshold)
    self.on_logits = on_logits
    kw = dict(trainable=False,
              synchronization=tf.VariableSynchronization.ON_WRITE,
              aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    self.fixed_index = {}
    self.fixed_logits = {}
    for group in arch.groups:
      shape = (group.num_decisions, len(group.candidates))
      self.fixed_index[group.name] = tf.Variable(
          -tf.ones([shape[0]], tf.int64), name=f"fixed_{group.name}", **kw)
      self.fixed_logits[group.name] = tf.Variable(
          tf.zeros(shape, arch.logits[group.name].dtype),
          name=f"fixed_logits_{group.name}", **kw)

  def fixed(self) -> dict[str, np.ndarray]:
    """Group → ``[E]`` fixed candidate index, ``-1`` where still sampled."""
    return {g: v.numpy() for g, v in self.fixed_index.items()}

  def num_fixed(self) -> int:
    return int(sum((f >= 0).sum() for f in self.fixed().values()))

  def num_decisions(self) -> int:
    return sum(g.num_decisions for g in self.arch.groups)

  def check(self) -> list[tuple[str, int, int]]:
    """Fixes every decision whose gap reached h; returns the new ones.

    Returns:
      ``(group, decision, candidate index)`` of each newly fixed decision.
    """
    newly = []
    gaps = decision_gaps(self.arch, self.on_logits)
    for group in self.arch.groups:
      name = group.name
      fixed = self.fixed_index[name].numpy()
      logits = self.arch.logits[name].numpy()
      best = np.argmax(np.where(group.mask_array(), logits, -np.inf), axis=-1)
      new_rows = np.flatnonzero((fixed < 0) & (gaps[name] >= self.threshold))
      if not len(new_rows):
        continue
      fixed[new_rows] = best[new_rows]
      frozen = self.fixed_logits[name].numpy()
      frozen[new_rows] = logits[new_rows]
      self.fixed_index[name].assign(fixed)
      self.fixed_logits[name].assign(frozen)
      newly.extend((name, int(e), int(best[e])) for e in new_rows)
    return newly

  def _masks(self) -> list[tf.Tensor]:
    return [tf.greater_equal(self.fixed_index[g], 0)[:, None]
            for g in self.arch.group_names]

  def mask_gradients(self, grads):
    """α-gradients (group order) with fixed rows set to zero."""
    return [tf.where(m, tf.zeros_like(g), g)
            for m, g in zip(self._masks(), grads)]

  def restore_fixed(self) -> None:
    """Resets fixed rows of α to their values when they were fixed."""
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and tf.distribute.has_strategy():
      ctx.merge_call(self._restore)
    else:
      self._restore(tf.distribute.get_strategy())

  def _restore(self, strategy):
    for name, mask in zip(self.arch.group_names, self._masks()):
      frozen = tf.convert_to_tensor(self.fixed_logits[name])
      strategy.extended.update(
          self.arch.logits[name],
          lambda v, f, m: v.assign(tf.where(m, f, v)), args=(frozen, mask),
          group=False)
