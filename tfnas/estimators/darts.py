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
      d = g + tf.cast(opt.weight_decay, w.dtype) * w
      d += tf.cast(opt.momentum, w.dtype) * tf.convert_to_tensor(
          opt.momentum_buffer(i))
      unrolled.append(w - tf.cast(xi, w.dtype) * d)
    return unrolled, xi

  def arch_gradient(self, ctx: StepContext, train_batch, val_batch, step=None):
    """The unrolled α gradient (all-reduced); also the val loss and logits."""
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
    d_alpha, v = grads[:len(avars)], grads[len(avars):]
    eps = self.r / _global_norm(v)
    w0 = [tf.convert_to_tensor(w) for w in wvars]
    plus = [w + tf.cast(eps, w.dtype) * d for w, d in zip(w0, v)]
    minus = [w - tf.cast(eps, w.dtype) * d for w, d in zip(w0, v)]
    g_plus = self._arch_grad_at(ctx, plus, train_batch)
    # The two passes are independent; sequence them so every replica issues
    # its collectives (all-reduces, synchronized BN) in the same order.
    with tf.control_dependencies(g_plus):
      minus = [tf.identity(m) for m in minus]
    g_minus = self._arch_grad_at(ctx, minus, train_batch)
    arch_grads = [
        da - tf.cast(xi, da.dtype) * (gp - gm) / (2 * tf.cast(eps, da.dtype))
        for da, gp, gm in zip(d_alpha, g_plus, g_minus)]
    return arch_grads, loss, logits
