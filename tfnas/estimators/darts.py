"""DARTS first- and second-order architecture gradients (DARTS section 2.3)."""

from __future__ import annotations

import keras
import tensorflow as tf

from tfnas.estimators.base import Estimator
from tfnas.train.step import StepContext


def _global_norm(values):
  return tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(v)) for v in values]))


def _after(dependencies, batch):
  """``batch`` gated on ``dependencies``: work on it starts after them.

  Inside a ``tf.function`` the executor may start any op whose inputs are
  ready. The w pass's candidate ops do not read α, so without this gate they
  run concurrently with the α pass and both passes' activations are alive at
  once (peak memory ~1.5x a single pass).
  """
  with tf.control_dependencies(list(dependencies)):
    return tf.nest.map_structure(tf.identity, batch)


class _AlphaThenWeights(Estimator):
  """A DARTS step: the α step (``arch_gradient``), then the w step.

  ``phases`` splits it into the two for the loop; ``step`` is both in one.
  """

  def arch_gradient(self, ctx: StepContext, train_batch, val_batch, step=None):
    raise NotImplementedError

  def _arch_step(self, ctx, train_batch, val_batch, step):
    """Applies the α step; returns its gradients and the val metrics."""
    grads, loss, logits = self.arch_gradient(ctx, train_batch, val_batch, step)
    ctx.apply_arch(grads)
    return grads, ctx.metrics("val", loss, logits, val_batch[1])

  def arch_phase(self, ctx: StepContext, train_batch, val_batch, step):
    return self._arch_step(ctx, train_batch, val_batch, step)[1]

  def weight_phase(self, ctx: StepContext, train_batch, val_batch, step):
    del val_batch, step
    return self.weight_step(ctx, train_batch)

  def phases(self):
    return (self.arch_phase, self.weight_phase)

  def step(self, ctx: StepContext, train_batch, val_batch, step):
    grads, metrics = self._arch_step(ctx, train_batch, val_batch, step)
    metrics.update(self.weight_step(ctx, _after(grads, train_batch)))
    return metrics


class DartsFirstOrder(_AlphaThenWeights):
  """α ← α − η_α ∇α L_val(w, α); then w ← w − η_w ∇w L_train(w, α)."""

  def arch_gradient(self, ctx: StepContext, train_batch, val_batch, step=None):
    """All-reduced ∇α L_val(w, α); also returns the val loss and logits."""
    images, labels = val_batch
    with tf.GradientTape() as tape:
      weights = ctx.distribution.sample(ctx.arch, step)
      logits = ctx.forward(images, weights, training=True)
      loss = ctx.loss(logits, labels)
    grads = ctx.all_reduce(ctx.gradients(tape, loss, ctx.arch_variables))
    return grads, loss, logits


class DartsSecondOrder(_AlphaThenWeights):
  """Unrolled α gradient with the finite-difference Hessian-vector product.

  With ξ the current weight learning rate, μ the SGD momentum and λ the
  weight decay, exactly as the DARTS code forms it:
    w' = w − ξ (μ·buf + ∇w L_train(w, α) + λ w)
    v  = ∇w' L_val(w', α)
    ε  = r / ‖v‖,  w± = w ± ε v          (on the ORIGINAL w; r = 0.01)
    ∇α = ∇α L_val(w', α) − ξ (∇α L_train(w⁺, α) − ∇α L_train(w⁻, α)) / 2ε
  The unrolled weights are evaluated functionally (``keras.StatelessScope``)
  so the network's variables are never overwritten mid-step.
  """

  def __init__(self, r: float = 0.01):
    self.r = r
    self._scratch_alpha = self._scratch_v = None  # Made by `build`.

  def _arch_grad_at(self, ctx, values, batch):
    images, labels = batch
    wvars = ctx.weight_variables
    with tf.GradientTape() as tape:
      weights = ctx.distribution.sample(ctx.arch)
      with keras.StatelessScope(state_mapping=list(zip(wvars, values))):
        loss = ctx.loss(ctx.forward(images, weights, training=True), labels)
    return ctx.all_reduce(ctx.gradients(tape, loss, ctx.arch_variables))

  def unrolled_weights(self, ctx: StepContext, train_batch):
    """w' = w − ξ (μ·buf + ∇w L_train + λ w) with all-reduced gradients."""
    images, labels = train_batch
    wvars = ctx.weight_variables
    with tf.GradientTape() as tape:
      weights = ctx.distribution.sample(ctx.arch)
      loss = ctx.loss(ctx.forward(images, weights, training=True), labels)
    grads = ctx.all_reduce(ctx.gradients(tape, loss, wvars))
    opt = ctx.weight_optimizer
    xi = opt.current_lr()
    unrolled = []
    for i, (v, g) in enumerate(zip(wvars, grads)):
      w = tf.convert_to_tensor(v)
      d = g + tf.cast(opt.decay_of(v), w.dtype) * w
      d += tf.cast(opt.momentum, w.dtype) * tf.convert_to_tensor(
          opt.momentum_buffer(i))
      unrolled.append(w - tf.cast(xi, w.dtype) * d)
    return unrolled, xi

  def _unrolled_val_gradients(self, ctx, train_batch, val_batch, step):
    """∇α and ∇w' of L_val(w', α) (all-reduced), ξ, the val loss, logits."""
    wvars = ctx.weight_variables
    avars = ctx.arch_variables
    unrolled, xi = self.unrolled_weights(ctx, train_batch)
    images, labels = val_batch
    with tf.GradientTape() as tape:
      tape.watch(unrolled)
      weights = ctx.distribution.sample(ctx.arch, step)
      with keras.StatelessScope(state_mapping=list(zip(wvars, unrolled))):
        logits = ctx.forward(images, weights, training=True)
      loss = ctx.loss(logits, labels)
    grads = ctx.all_reduce(ctx.gradients(tape, loss, avars + unrolled))
    return grads[:len(avars)], grads[len(avars):], xi, loss, logits

  def _with_hessian_term(self, ctx, train_batch, d_alpha, v, xi):
    """∇α L_val(w') − ξ (∇α L_train(w⁺) − ∇α L_train(w⁻)) / 2ε."""
    eps = self.r / _global_norm(v)
    w0 = [tf.convert_to_tensor(w) for w in ctx.weight_variables]
    plus = [w + tf.cast(eps, w.dtype) * d for w, d in zip(w0, v)]
    minus = [w - tf.cast(eps, w.dtype) * d for w, d in zip(w0, v)]
    g_plus = self._arch_grad_at(ctx, plus, train_batch)
    # The two passes are independent; sequence them so every replica issues
    # its collectives (all-reduces, synchronized BN) in the same order.
    with tf.control_dependencies(g_plus):
      minus = [tf.identity(m) for m in minus]
    g_minus = self._arch_grad_at(ctx, minus, train_batch)
    return [
        da - tf.cast(xi, da.dtype) * (gp - gm) / (2 * tf.cast(eps, da.dtype))
        for da, gp, gm in zip(d_alpha, g_plus, g_minus)]

  def arch_gradient(self, ctx: StepContext, train_batch, val_batch, step=None):
    """The unrolled α gradient (all-reduced); also the val loss and logits."""
    d_alpha, v, xi, loss, logits = self._unrolled_val_gradients(
        ctx, train_batch, val_batch, step)
    return (self._with_hessian_term(ctx, train_batch, d_alpha, v, xi), loss,
            logits)

  # Three phases: (1) w' and the gradients at w', (2) the finite-difference
  # passes and the α update, (3) the w step. The α step alone is a graph of
  # four forward+backward passes; TF's one-time optimisation of it set the
  # process peak memory. Phase 1 leaves ∇α L_val(w') and v = ∇w' L_val(w')
  # for phase 2 in per-replica scratch variables (made by `build`).

  def build(self, ctx: StepContext) -> None:
    on_read = dict(trainable=False,
                   synchronization=tf.VariableSynchronization.ON_READ,
                   aggregation=tf.VariableAggregation.NONE)
    self._scratch_alpha = [tf.Variable(tf.zeros(v.shape, v.dtype), **on_read)
                           for v in ctx.arch_variables]
    self._scratch_v = [tf.Variable(tf.zeros(v.shape, v.dtype), **on_read)
                       for v in ctx.weight_variables]

  def _scratch(self):
    if self._scratch_v is None:
      raise RuntimeError("DartsSecondOrder.phases(): call build(ctx) first "
                         "(inside the strategy's scope)")
    return self._scratch_alpha, self._scratch_v

  def unrolled_phase(self, ctx: StepContext, train_batch, val_batch, step):
    scratch_alpha, scratch_v = self._scratch()
    d_alpha, v, _, loss, logits = self._unrolled_val_gradients(
        ctx, train_batch, val_batch, step)
    for target, value in zip(scratch_alpha + scratch_v, d_alpha + v):
      target.assign(value)
    return ctx.metrics("val", loss, logits, val_batch[1])

  def hessian_phase(self, ctx: StepContext, train_batch, val_batch, step):
    del val_batch, step
    scratch_alpha, scratch_v = self._scratch()
    d_alpha = [tf.convert_to_tensor(s) for s in scratch_alpha]
    v = [tf.convert_to_tensor(s) for s in scratch_v]
    xi = ctx.weight_optimizer.current_lr()
    ctx.apply_arch(self._with_hessian_term(ctx, train_batch, d_alpha, v, xi))
    return {}

  def phases(self):
    return (self.unrolled_phase, self.hessian_phase, self.weight_phase)
