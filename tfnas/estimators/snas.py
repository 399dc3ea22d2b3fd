"""SNAS: single-level search gradient through a relaxed sample (SNAS 2.2-2.4).

θ and α are updated from ONE backward pass of ``L_θ(Z) + η C(Z)`` on the same
training batch (eq. 4 / eq. 9): the α-gradient of the data loss flows
through the reparameterised Gumbel-softmax sample Z (eq. 6), the resource
term's through the chosen estimator (policy gradient by default, eq. 11).
"""

from __future__ import annotations

import tensorflow as tf

from tfnas.estimators.base import Estimator
from tfnas.objectives import ResourceConstraint
from tfnas.train.step import StepContext


class SnasEstimator(Estimator):
  """Single-level SNAS step; ``resource`` is optional (η = 0 without it)."""

  uses_val_batch = False

  def __init__(self, resource: ResourceConstraint | None = None):
    self.resource = resource
    self.extra_metrics = ("train/resource_cost",) if resource else ()

  def gradients(self, ctx: StepContext, batch, step):
    """All-reduced (w grads, α grads) of one backward pass, plus metrics."""
    images, labels = batch
    wvars, avars = ctx.weight_variables, ctx.arch_variables
    with tf.GradientTape() as tape:
      sample, log_sample = ctx.distribution.sample_with_log(ctx.arch, step)
      logits = ctx.forward(images, sample, training=True)
      loss = ctx.loss(logits, labels)
      total = loss
      cost = None
      if self.resource is not None and self.resource.weight:
        # Z is identical on every replica: count the penalty once.
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync
        surrogate = self.resource.surrogate(ctx.arch, sample, log_sample,
                                            ctx.distribution, step)
        total = loss + surrogate / float(replicas)
        cost = self.resource.cost(sample) / float(replicas)
    grads = ctx.all_reduce(ctx.gradients(tape, total, wvars + avars))
    metrics = ctx.metrics("train", loss, logits, labels)
    if cost is not None:
      metrics["train/resource_cost"] = tf.cast(cost, tf.float32)
    return grads[:len(wvars)], grads[len(wvars):], metrics

  def step(self, ctx: StepContext, train_batch, val_batch, step):
    w_grads, a_grads, metrics = self.gradients(ctx, train_batch, step)
    ctx.apply_weights(w_grads)
    ctx.apply_arch(a_grads)
    return metrics
