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
    decision: what one decision is called in logs and TensorBoard tags
      (``edge`` of a cell, ``block`` of a single-path network).
  """
  name: str
  candidates: tuple[str, ...]
  num_decisions: int
  mask: tuple[tuple[bool, ...], ...] | None = None
  decision: str = "edge"

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

  def mask(self, name: str) -> tf.Tensor:
    """``[num_decisions, num_candidates]`` booleans: what each decision
    offers (all True without a mask)."""
    return self._masks[name]

  def masked_logits(self, name: str) -> tf.Tensor:
    """Logits with unavailable candidates set to -inf."""
    logits = tf.convert_to_tensor(self.logits[name])
    return tf.where(self.mask(name), logits,
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

  def sample(self, arch: ArchParams, step=None,
             salt: int = 0) -> dict[str, tf.Tensor]:
    """The sample at ``step``; ``salt`` picks an independent noise stream
    (`EVAL_SALT`: evaluation draws, apart from every training step's)."""
    raise NotImplementedError


class SoftmaxDistribution(ArchDistribution):
  """DARTS: the deterministic continuous relaxation softmax(α)."""

  def sample(self, arch: ArchParams, step=None,
             salt: int = 0) -> dict[str, tf.Tensor]:
    return {name: arch.probabilities(name) for name in arch.group_names}


def linear_temperature(start: float, end: float, total_steps: int):
  """λ(step): straight line from ``start`` (step 0) to ``end`` (last step)."""
  def schedule(step):
    frac = tf.cast(step, tf.float32) / float(max(total_steps - 1, 1))
    return start + (end - start) * tf.minimum(frac, 1.0)
  return schedule


def exponential_temperature(start: float, end: float, total_steps: int):
  """λ(step) = start · (end/start)^(step/(total-1)): geometric annealing."""
  def schedule(step):
    frac = tf.cast(step, tf.float32) / float(max(total_steps - 1, 1))
    return start * tf.pow(end / start, tf.minimum(frac, 1.0))
  return schedule


TEMPERATURE_SCHEDULES = {"linear": linear_temperature,
                         "exponential": exponential_temperature}


#: Salt of evaluation draws: a noise stream apart from the training steps'
#: (whose salts are the group indices).
EVAL_SALT = 1000


def stateless_seed(seed: int, step, salt: int = 0) -> tf.Tensor:
  """A [2] int32 seed from (run seed, step): the same on every replica and
  reproducible after resume (the step counter is checkpointed)."""
  step = tf.cast(step if step is not None else 0, tf.int64)
  return tf.cast(tf.stack([tf.constant(seed * 1000003 + salt, tf.int64),
                           step]) % (2**31 - 1), tf.int32)


class RelaxedOneHotDistribution(ArchDistribution):
  """SNAS: Gumbel-softmax samples (TFP ``RelaxedOneHotCategorical``).

  One sample per step per decision group (cell type): an independent draw
  per edge, shared by every cell of that type and the whole batch; with
  ``per_cell`` each cell gets its own draw (shape ``[cells, E, K]``). The
  sample is soft (no straight-through), reparameterised, and drawn with a
  stateless seed from (seed, step), so all replicas draw the same Z.

  Args:
    temperature: callable step → λ (see ``TEMPERATURE_SCHEDULES``).
    seed: run seed.
    cells_per_group: mapping group → number of cells, used with per_cell.
  """

  def __init__(self, temperature, seed: int = 0, per_cell: bool = False,
               cells_per_group=None):
    self.temperature = temperature
    self.seed = seed
    self.per_cell = per_cell
    self.cells_per_group = dict(cells_per_group or {})

  def distribution(self, arch: ArchParams, name: str, step):
    """TFP's relaxed one-hot categorical of one group at step's λ."""
    import tensorflow_probability as tfp  # Heavy import; only when used.
    logits = arch.masked_logits(name)
    temperature = tf.cast(self.temperature(step), logits.dtype)
    return tfp.distributions.RelaxedOneHotCategorical(temperature,
                                                      logits=logits)

  def _log_space(self, arch: ArchParams, name: str, step):
    # Y = log Z follows TFP's ExpRelaxedOneHotCategorical. Sampling and
    # scoring in log space stays finite at low λ, where entries of Z
    # underflow to 0; log p_Z and log p_Y differ by a Jacobian that does not
    # depend on α, so their α-gradients (the score function) are equal.
    import tensorflow_probability as tfp
    logits = arch.masked_logits(name)
    temperature = tf.cast(self.temperature(step), logits.dtype)
    return tfp.distributions.ExpRelaxedOneHotCategorical(temperature,
                                                         logits=logits)

  def log_prob(self, arch: ArchParams, name: str, log_sample, step):
    """log-density of a log-space sample (per edge, or per cell and edge).

    A decision that offers only some candidates (a mask) is a relaxed
    categorical over those K' candidates: its density is TFP's formula over
    them alone (unoffered entries of the sample are -inf, where TFP's
    density over all K would be NaN).
    """
    if arch.group(name).mask is None:
      return self._log_space(arch, name, step).log_prob(log_sample)
    logits = tf.convert_to_tensor(arch.logits[name])
    mask = arch.mask(name)
    lam = tf.cast(self.temperature(step), logits.dtype)
    log_sample = tf.convert_to_tensor(log_sample, logits.dtype)
    # Offered entries only; the others are replaced before any arithmetic
    # so that no NaN reaches the gradient through tf.where.
    terms = logits - lam * tf.where(mask, log_sample,
                                    tf.zeros_like(log_sample))
    k = tf.reduce_sum(tf.cast(mask, logits.dtype), axis=-1)
    lse = tf.reduce_logsumexp(
        tf.where(mask, terms, tf.constant(-np.inf, logits.dtype)), axis=-1)
    total = tf.reduce_sum(tf.where(mask, terms, tf.zeros_like(terms)),
                          axis=-1)
    return (tf.math.lgamma(k) + (k - 1.0) * tf.math.log(lam) + total
            - k * lse)

  def sample_with_log(self, arch: ArchParams, step=None, salt: int = 0):
    """(Z, log Z) per group; Z is reparameterised (carries α-gradients)."""
    samples, logs = {}, {}
    for i, name in enumerate(arch.group_names):
      dist = self._log_space(arch, name, step)
      seed = stateless_seed(self.seed, step, salt=salt + i)
      if self.per_cell:
        y = dist.sample(self.cells_per_group.get(name, 1), seed=seed)
      else:
        y = dist.sample(seed=seed)
      logs[name] = y
      samples[name] = tf.exp(y)
    return samples, logs

  def sample(self, arch: ArchParams, step=None,
             salt: int = 0) -> dict[str, tf.Tensor]:
    return self.sample_with_log(arch, step, salt)[0]


class ArgmaxDistribution(ArchDistribution):
  """The one-hot argmax architecture (child network of SNAS Table 1).

  Includes ``none``: an edge whose argmax is ``none`` contributes nothing.
  """

  def sample(self, arch: ArchParams, step=None,
             salt: int = 0) -> dict[str, tf.Tensor]:
    out = {}
    for name in arch.group_names:
      logits = arch.masked_logits(name)
      out[name] = tf.one_hot(tf.argmax(logits, axis=-1), logits.shape[-1],
                             dtype=logits.dtype)
    return out


class OneHotDistribution(ArchDistribution):
  """DSNAS: hard one-hot samples Z ~ Cat(softmax(α)) (DSNAS section 3.2).

  Uses TFP's ``OneHotCategorical(logits=α)`` per decision group. Samples are
  drawn eagerly as Python/numpy indices with a stateless seed from
  (seed, step), so every replica draws the same child and a resumed run
  draws what an uninterrupted one would. Decisions fixed by progressive
  early stop (section 3.5) are not sampled: their fixed index is used.

  ``sample`` (the interface the generic loop uses) returns the one-hot
  weights of a fresh draw; single-path steps use ``sample_indices``, which
  also gives the Python ints that select the ops to run.

  Args:
    seed: run seed.
  """

  single_path = True

  def __init__(self, seed: int = 0):
    self.seed = seed

  @staticmethod
  def distribution(arch: ArchParams, name: str):
    """TFP's one-hot categorical of one group (masked candidates: p = 0)."""
    import tensorflow_probability as tfp  # Heavy import; only when used.
    return tfp.distributions.OneHotCategorical(
        logits=arch.masked_logits(name), dtype=arch.logits[name].dtype)

  def sample_indices(self, arch: ArchParams, step=None,
                     fixed: Mapping[str, np.ndarray] | None = None,
                     salt: int = 0) -> dict[str, np.ndarray]:
    """One candidate index per decision, group → int array ``[E]``.

    Args:
      arch: α.
      step: global step (seeds the draw).
      fixed: optional group → ``[E]`` ints, ``-1`` where the decision is
        still sampled, else the index to use.
      salt: noise stream (see `ArchDistribution.sample`).
    """
    out = {}
    for i, name in enumerate(arch.group_names):
      z = self.distribution(arch, name).sample(
          seed=stateless_seed(self.seed, step, salt=salt + i))
      index = np.argmax(z.numpy(), axis=-1).astype(np.int64)
      if fixed is not None and name in fixed:
        f = np.asarray(fixed[name])
        index = np.where(f >= 0, f, index)
      out[name] = index
    return out

  def log_prob(self, arch: ArchParams, name: str, one_hot) -> tf.Tensor:
    """Per-decision ``log p_α(Z_e)``, shape ``[E]``."""
    return self.distribution(arch, name).log_prob(one_hot)

  def sample(self, arch: ArchParams, step=None,
             salt: int = 0) -> dict[str, tf.Tensor]:
    return one_hot_weights(arch, self.sample_indices(arch, step, salt=salt))


def one_hot_weights(arch: ArchParams, indices: Mapping[str, np.ndarray]
                    ) -> dict[str, tf.Tensor]:
  """Group → ``[E, K]`` one-hot tensor of the given indices (α's dtype):
  Python or numpy ints, or int tensors (a switched single-path step)."""
  return {name: tf.one_hot(indices[name] if isinstance(indices[name],
                                                       tf.Tensor)
                           else np.asarray(indices[name]),
                           len(arch.group(name).candidates),
                           dtype=arch.logits[name].dtype)
          for name in arch.group_names}


def argmax_indices(arch: ArchParams) -> dict[str, np.ndarray]:
  """Group → ``[E]`` index of the largest (allowed) logit per decision."""
  return {name: np.argmax(arch.masked_logits(name).numpy(), axis=-1)
          for name in arch.group_names}
