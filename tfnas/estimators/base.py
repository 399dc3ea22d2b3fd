"""The estimator interface: how one search step forms and applies gradients."""

from __future__ import annotations

import tensorflow as tf

from tfnas.train.step import StepContext


#: Per-replica sums every step returns per prefix (see StepContext.metrics).
METRIC_SUMS = ("loss_sum", "correct", "count")


class Estimator:
  """One search step of a method.

  ``step`` runs per replica inside ``strategy.run``. It draws the
  architecture sample from ``ctx.distribution``, computes the weight and
  architecture gradients, all-reduces them and applies them through
  ``ctx.apply_weights`` / ``ctx.apply_arch`` (the order is the method's:
  DARTS updates α before w). It returns per-replica metric sums from
  ``ctx.metrics``.
  """

  #: Whether the step consumes a validation batch (bilevel methods).
  uses_val_batch = True
  #: False: the loop calls ``step`` eagerly, once per step, from Python (a
  #: single-path method choosing the child with Python ints, DSNAS); True:
  #: ``steps_per_loop`` steps run inside one ``tf.function``. Traced steps
  #: are traced as written, without autograph (`step_loops.as_written`):
  #: a choice made by a tensor must be ``tf.cond`` / ``tf.switch_case``.
  compiled_step = True
  #: True: ``child_step`` runs the step of a given single-path child as
  #: pure TensorFlow, which the loop may trace once per child when few
  #: remain (``--compiled_children``).
  child_steps = False
  #: Extra per-step metrics (averaged over steps by the loop); each replica
  #: returns its share (value / replicas) so the cross-replica sum is exact.
  extra_metrics: tuple[str, ...] = ()

  def metric_keys(self) -> list[str]:
    """Keys of the dict ``step`` returns."""
    prefixes = ("train", "val") if self.uses_val_batch else ("train",)
    keys = [f"{p}/{k}" for p in prefixes for k in METRIC_SUMS]
    return keys + list(self.extra_metrics)

  def step(self, ctx: StepContext, train_batch, val_batch,
           step: tf.Tensor) -> dict[str, tf.Tensor]:
    raise NotImplementedError

  def child_step(self, ctx: StepContext, train_batch,
                 indices) -> dict[str, tf.Tensor]:
    """The step of the child ``indices`` (group → per-decision candidate
    ints); estimators with ``child_steps`` implement it."""
    raise NotImplementedError(
        f"{type(self).__name__} has no per-child step (child_steps=False)")

  def phases(self) -> tuple:
    """The step as consecutive per-replica phases, each compiled on its own.

    Each phase has the signature of ``step`` and returns its part of the
    metrics; running them in order is one step. The default is the whole
    step as one phase (the loop then runs ``steps_per_loop`` steps in one
    ``tf.function``). A bilevel method returns its α step and its w step:
    two graphs of about half the size, which TensorFlow optimises one at a
    time on their first calls. That one-time optimisation of the whole step
    graph is what set a DARTS search's process peak memory.
    """
    return (self.step,)

  def build(self, ctx: StepContext) -> None:
    """Creates what the phases need beyond ``ctx`` (called once by the
    loop, inside the strategy's scope, before any phase is traced)."""
    del ctx

  def weight_step(self, ctx: StepContext, batch, prefix: str = "train"):
    """The ordinary w update on one batch under the current α sample."""
    images, labels = batch
    with tf.GradientTape() as tape:
      weights = ctx.distribution.sample(ctx.arch)
      logits = ctx.forward(images, weights, training=True)
      loss = ctx.loss(logits, labels)
    grads = ctx.all_reduce(ctx.gradients(tape, loss, ctx.weight_variables))
    ctx.apply_weights(grads)
    return ctx.metrics(prefix, loss, logits, labels)
