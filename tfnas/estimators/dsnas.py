"""DSNAS: discrete single-path search gradient (DSNAS 3.2-3.3, Algorithm 1).

One step:

1. draw a strictly one-hot Z per decision (block / edge) from
   ``OneHotCategorical(logits=α)``; decisions fixed by progressive early stop
   use their fixed choice;
2. run the child: only the chosen op of every decision executes, its output
   multiplied by a gate of value 1 (the "dummy 1");
3. ONE backward pass of the training loss gives ∂L/∂θ (chosen ops only) and
   ``C_e = ∂L/∂gate_e`` (eq. 6: the cost of decision e);
4. θ ← SGD(∂L/∂θ), and α ← Adam(Σ_e C_e ∇α log p_α(Z_e)) (eq. 5), on the same
   batch (single level).

The step runs eagerly at the Python level (``compiled_step = False``): the
child is chosen by Python ints, while each chosen op runs as an already
traced shared ``tf.function`` (`tfnas.layers.shared_function`), so tracing is
bounded by (op structures × input shapes), and time and memory are the
child's. With ``--single_path_step=switch`` the loop instead traces
`DsnasEstimator.switch_step` once: the child comes in as tensors and every
edge (cell spaces) or block (ShuffleNet) picks its op at run time
(`tfnas.layers.switch_path`); in the DARTS space that is nearly as fast per
step as a graph traced for one child. Once progressive early stop
leaves few possible children
(``--compiled_children``, default: every decision fixed), the loop traces
`DsnasEstimator.child_step` of each child met as one graph instead, which
runs about twice as fast per step. WORKSPACE_NOTES.md records the
measurements behind both choices.

Weight decay and momentum act on the weights the step's child used (its
chosen ops' and the shared ones), as its gradient does: a candidate not drawn
this step keeps its weights and its momentum. The paper does not say; the
authors' public code instead gives every candidate a zero gradient each step,
so there every candidate also decays and moves on its old momentum (over a
240-epoch ImageNet search with four candidates per block, ~4x the decay a
candidate gets here). ``update_unsampled`` (``--update_unsampled``) does the
same here.

Options (all off by default, as in the paper's Algorithm 1):

* reward normalisation: ``C_e`` is replaced by ``(C_e - m_e) / (s_e + ε)``
  with running (exponential moving) mean ``m_e`` and standard deviation
  ``s_e`` of ``C_e`` per decision, estimated from previous steps. The
  mean is a baseline: it lowers the variance of the score-function
  estimate without biasing it (it does not depend on the current Z). The
  division rescales each decision's gradient by its own ``1 / s_e``, which
  changes the direction of the α update (not only its noise).
* FLOPs penalty: the objective gains ``η · E_Z[F(Z)]`` with ``F(Z) =
  Σ_e f_e(Z_e)`` the analytic FLOPs of the child divided by those of the
  costliest child (so F ∈ [0, 1]); its α-gradient is taken exactly,
  ``η ∇α Σ_e Σ_k p_ek f_ek`` (no sampling noise). θ is unaffected.
* FLOPs budget (with the penalty): a child is meant to cost at most T FLOPs
  (DSNAS 4.2 searches under "FLOPS ≤ 330M" without saying how). The penalty
  gradient is applied only on steps whose sampled child costs more than T,
  so its expected α update is ``P(F(Z) > T) · η ∇α E_Z[F(Z)]``: it fades
  as the distribution settles on children within the budget, and stops
  once no sampled child exceeds it. (The authors' code gates its penalty
  the same way, on the sampled child's FLOPs.)
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import tensorflow as tf

from tfnas.arch import OneHotDistribution, one_hot_weights
from tfnas.estimators.base import Estimator
from tfnas.train import optim
from tfnas.train.step import StepContext


def _gate_costs(groups, gate_grads, gates) -> dict[str, tf.Tensor]:
  """Group → ``[E]`` costs ``C_e = ∂L/∂gate`` at each chosen entry (the
  other entries are not used)."""
  return {g: tf.reduce_sum(gr * gates[g], axis=-1)
          for g, gr in zip(groups, gate_grads)}


class RewardNormalizer(tf.Module):
  """Running mean / std of the per-decision costs C_e (checkpointed).

  Args:
    groups: group name → number of decisions.
    decay: EMA decay of the statistics.
    epsilon: added to the standard deviation.
  """

  def __init__(self, groups: Mapping[str, int], decay: float = 0.99,
               epsilon: float = 1e-8, name: str = "reward_normalizer"):
    super().__init__(name=name)
    self.decay = decay
    self.epsilon = epsilon
    # Every replica computes identical statistics from all-reduced costs:
    # keep one copy's write.
    kw = dict(trainable=False,
              synchronization=tf.VariableSynchronization.ON_WRITE,
              aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    self.mean = {g: tf.Variable(tf.zeros([n]), name=f"mean_{g}", **kw)
                 for g, n in groups.items()}
    self.second = {g: tf.Variable(tf.zeros([n]), name=f"second_{g}", **kw)
                   for g, n in groups.items()}
    self.count = tf.Variable(0, dtype=tf.int64, name="count", **kw)

  def __call__(self, costs: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Normalised costs (identity at the first step), then updates stats.

    Pure TensorFlow, so it runs eagerly and inside a compiled child step.
    """
    out = {}
    first = tf.equal(self.count, 0)
    # Bias-corrected EMA, as Adam's moments (the correction is 0 only at
    # the first step, where the costs pass through unchanged).
    correction = tf.maximum(
        1.0 - self.decay ** tf.cast(self.count, tf.float32), 1e-30)
    for g, c in costs.items():
      mean = self.mean[g] / correction
      var = tf.maximum(self.second[g] / correction - tf.square(mean), 0.0)
      out[g] = tf.where(first, c, (c - mean) / (tf.sqrt(var) + self.epsilon))
      self.mean[g].assign(self.decay * self.mean[g] + (1 - self.decay) * c)
      self.second[g].assign(self.decay * self.second[g] +
                            (1 - self.decay) * tf.square(c))
    self.count.assign_add(1)
    return out


class DsnasEstimator(Estimator):
  """The DSNAS step; see the module docstring.

  Args:
    reward_normalizer: optional `RewardNormalizer`.
    flops_tables: optional group → ``[E, K]`` normalised FLOPs per
      candidate (`tfnas.objectives.DecisionFlops.normalised_tables`).
    flops_weight: η of the FLOPs penalty.
    flops_target: optional budget T on the scale of ``flops_tables`` (see
      `tfnas.objectives.DecisionFlops.normalise`): the penalty acts only
      on steps whose sampled child exceeds it.
  """

  uses_val_batch = False
  #: The loop runs this step eagerly (Python-level child selection).
  compiled_step = False
  child_steps = True

  def __init__(self, reward_normalizer: RewardNormalizer | None = None,
               flops_tables: Mapping[str, np.ndarray] | None = None,
               flops_weight: float = 0.0,
               flops_target: float | None = None,
               update_unsampled: bool = False):
    self.reward_normalizer = reward_normalizer
    self.update_unsampled = update_unsampled
    self.flops_weight = flops_weight
    self.flops_tables = ({g: tf.constant(t, tf.float32)
                          for g, t in flops_tables.items()}
                         if flops_tables is not None and flops_weight else None)
    if flops_target is not None and self.flops_tables is None:
      raise ValueError("flops_target needs flops_tables and flops_weight > 0")
    self.flops_target = flops_target
    self.extra_metrics = ()
    if self.flops_tables:
      self.extra_metrics = ("train/flops",)
      if flops_target is not None:
        self.extra_metrics += ("train/over_flops_target",)

  def checkpoint_objects(self) -> dict:
    """Trackable state the loop checkpoints with the run."""
    if self.reward_normalizer is None:
      return {}
    return {"reward_normalizer": self.reward_normalizer}

  @staticmethod
  def sample(ctx: StepContext, step) -> dict[str, np.ndarray]:
    """This step's child: group → ``[E]`` candidate indices."""
    dist = ctx.distribution
    if not isinstance(dist, OneHotDistribution):
      raise TypeError(f"DSNAS needs a OneHotDistribution, got {dist!r}")
    fixed = ctx.fixed_decisions.fixed() if ctx.fixed_decisions else None
    return dist.sample_indices(ctx.arch, int(step), fixed=fixed)

  @staticmethod
  def child_forward(ctx: StepContext, batch, indices, tape: tf.GradientTape):
    """The training-mode forward pass of the child ``indices``, under
    ``tape`` (which watches the one-hot gates).

    Returns:
      ``(gates, logits, loss)``: group → one-hot gates, the logits, the loss.
    """
    images, labels = batch
    gates = one_hot_weights(ctx.arch, indices)
    groups = ctx.arch.group_names
    arch_indices = {g: tuple(int(i) for i in indices[g]) for g in groups}
    tape.watch([gates[g] for g in groups])
    logits = ctx.forward(images, gates, arch_indices, training=True)
    return gates, logits, ctx.loss(logits, labels)

  def gradients(self, ctx: StepContext, batch, indices):
    """One forward/backward pass of the child given by ``indices``.

    Weight gradients are all-reduced together with the gate gradients, so α
    gradients (`arch_gradients`) are then formed identically on every
    replica.

    Returns:
      ``(used, w_grads, costs, gates, metrics)``: the weight variables the
      child used (all of them with ``update_unsampled``; zero gradients for
      the others) and their all-reduced gradients, group → ``[E]`` costs
      ``C_e = ∂L/∂gate_e``, the one-hot gates, per-replica metric sums.
    """
    _, labels = batch
    groups = ctx.arch.group_names
    wvars = ctx.weight_variables
    with tf.GradientTape() as tape:
      gates, logits, loss = self.child_forward(ctx, batch, indices, tape)
    # Underlying tf.Variables: a tape asked about Keras variables that the
    # step did not use fails in TF 2.21 (WORKSPACE_NOTES.md, known gaps).
    sources = [v.value for v in wvars] + [gates[g] for g in groups]
    grads = tape.gradient(loss, sources)
    used = [i for i, g in enumerate(grads[:len(wvars)]) if g is not None]
    gate_grads = [tf.zeros_like(gates[g]) if gr is None else gr
                  for g, gr in zip(groups, grads[len(wvars):])]
    reduced = ctx.all_reduce([grads[i] for i in used] + gate_grads)
    w_grads = reduced[:len(used)]
    costs = _gate_costs(groups, reduced[len(used):], gates)
    metrics = ctx.metrics("train", loss, logits, labels)
    if self.update_unsampled:
      # Zero gradients (equal on every replica: not all-reduced) for the
      # weights the child did not use: decay and momentum move them too.
      full = [None] * len(wvars)
      for i, g in zip(used, w_grads):
        full[i] = g
      w_grads = [tf.zeros_like(s) if g is None else g
                 for s, g in zip(sources, full)]
      used = range(len(wvars))
    return [wvars[i] for i in used], w_grads, costs, gates, metrics

  def arch_gradients(self, ctx: StepContext, gates, costs, metrics=None):
    """Σ_e C_e ∇α log p(Z_e) (+ the FLOPs term), zero on fixed decisions."""
    if self.reward_normalizer is not None:
      costs = self.reward_normalizer(costs)
    avars = ctx.arch_variables
    replicas = tf.distribute.get_replica_context().num_replicas_in_sync
    weight = None
    if self.flops_tables is not None:
      # The sampled child's normalised FLOPs (the same on every replica).
      flops = tf.add_n([tf.reduce_sum(gates[g] * self.flops_tables[g])
                        for g in ctx.arch.group_names])
      weight = tf.constant(self.flops_weight, tf.float32)
      if self.flops_target is not None:
        over = tf.cast(flops > self.flops_target, tf.float32)
        weight *= over
    with tf.GradientTape() as tape:
      terms = []
      for g in ctx.arch.group_names:
        log_p = ctx.distribution.log_prob(ctx.arch, g, gates[g])
        terms.append(tf.reduce_sum(tf.stop_gradient(costs[g]) * log_p))
        if weight is not None:
          probs = ctx.arch.probabilities(g)
          expected = tf.reduce_sum(
              tf.where(probs > 0, probs * self.flops_tables[g], 0.0))
          terms.append(weight * expected)
      surrogate = tf.add_n(terms)
    a_grads = StepContext.gradients(tape, surrogate, avars)
    if ctx.fixed_decisions is not None:
      a_grads = ctx.fixed_decisions.mask_gradients(a_grads)
    if weight is not None and metrics is not None:
      metrics["train/flops"] = flops / float(replicas)
      if self.flops_target is not None:
        metrics["train/over_flops_target"] = over / float(replicas)
    return a_grads

  def switch_step(self, ctx: StepContext, train_batch, indices):
    """The same step as `child_step`, for a child given as tensors
    (group → ``[E]`` int32), so that ONE traced graph serves every child
    (``--single_path_step=switch``; `tfnas.layers.switch_path`).

    Every weight gets a gradient (zeros off the child); the update of the
    candidates' weights is switched at run time to the chosen ops (one
    `optim.Switch` per decision over ``network.choice_variables``: an edge
    of every cell of its type, or a block), so it equals
    `child_step`'s, which updates exactly the weights that get a gradient:
    the chosen ops' and the shared ones (a ``none`` edge passes zero
    gradients back). With ``update_unsampled`` every weight is updated, as
    in `child_step`.
    """
    images, labels = train_batch
    groups = ctx.arch.group_names
    gates = one_hot_weights(ctx.arch, indices)
    wvars = ctx.weight_variables
    with tf.GradientTape() as tape:
      tape.watch([gates[g] for g in groups])
      logits = ctx.forward(images, gates, indices, training=True)
      loss = ctx.loss(logits, labels)
    grads = StepContext.gradients(
        tape, loss, [v.value for v in wvars] + [gates[g] for g in groups])
    reduced = ctx.all_reduce(grads)
    w_grads = reduced[:len(wvars)]
    costs = _gate_costs(groups, reduced[len(wvars):], gates)
    metrics = ctx.metrics("train", loss, logits, labels)
    # One switch per decision (an edge of every cell of its type, or a
    # block): only the chosen op's weights are updated.
    position = {id(v.value): i for i, v in enumerate(wvars)}
    num_ops = {g: len(ctx.arch.group(g).candidates) for g in groups}
    choices = {}
    for v, g, e, k in ctx.network.choice_variables():
      choices.setdefault((g, e), [[] for _ in range(num_ops[g])])[k].append(
          position[id(v.value)])
    switches = (None if self.update_unsampled else
                [optim.Switch(indices[g][e], c)
                 for (g, e), c in choices.items()])
    self._update(ctx, wvars, w_grads, gates, costs, metrics,
                 switches=switches)
    return metrics

  def step(self, ctx: StepContext, train_batch, val_batch, step):
    del val_batch  # Single level: θ and α learn from the same batch.
    return self.child_step(ctx, train_batch, self.sample(ctx, step))

  def child_step(self, ctx: StepContext, train_batch, indices):
    """The step of the child ``indices`` (group → ``[E]`` ints).

    Pure TensorFlow given the Python-int child, so the loop may also trace
    it as one graph per child (``--compiled_children``).
    """
    used, w_grads, costs, gates, metrics = self.gradients(ctx, train_batch,
                                                          indices)
    self._update(ctx, used, w_grads, gates, costs, metrics)
    return metrics

  def _update(self, ctx: StepContext, variables, w_grads, gates, costs,
              metrics, switches=None):
    """The end of every step: α-gradients from the costs, then θ (masked by
    ``switches``, see `_Optimizer.apply`) and α updates, then fixed
    decisions restored."""
    a_grads = self.arch_gradients(ctx, gates, costs, metrics)
    ctx.weight_optimizer.apply(w_grads, variables, switches=switches)
    ctx.apply_arch(a_grads)
    if ctx.fixed_decisions is not None:
      ctx.fixed_decisions.restore_fixed()
