"""Per-replica step math shared by every estimator.

An estimator's ``step`` runs inside ``strategy.run`` and uses a
:class:`StepContext` for everything that is not method-specific: the forward
pass, the loss scaled by the GLOBAL batch, gradients with unused variables
filled by zeros, the cross-replica sum, and the two optimizers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import tensorflow as tf

from tfnas.arch import ArchDistribution, ArchParams
from tfnas.distribute import ordered_all_reduce
from tfnas.train.optim import _Optimizer


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """Per-example cross-entropy, twice differentiable.

  ``tf.nn.sparse_softmax_cross_entropy_with_logits`` blocks second
  derivatives (its fused gradient is wrapped in ``prevent_gradient``), which
  unrolled and Hessian-based estimators need; log-softmax is exact.
  """
  num_classes = tf.shape(logits)[-1]
  targets = tf.one_hot(tf.cast(labels, tf.int32), num_classes,
                       dtype=logits.dtype)
  if label_smoothing:
    smoothing = tf.cast(label_smoothing, logits.dtype)
    targets = targets * (1 - smoothing) + smoothing / tf.cast(
        num_classes, logits.dtype)
  return -tf.reduce_sum(targets * tf.nn.log_softmax(logits), axis=-1)


def batch_sums(prefix: str, loss_sum, logits, labels) -> dict[str, tf.Tensor]:
  """Per-replica sums of one batch: ``{prefix}/loss_sum``, ``/correct``,
  ``/count``; the loops sum them over replicas and steps, then divide."""
  correct = tf.reduce_sum(tf.cast(tf.equal(
      tf.argmax(logits, -1, output_type=tf.int32),
      tf.cast(labels, tf.int32)), tf.float32))
  return {f"{prefix}/loss_sum": tf.cast(loss_sum, tf.float32),
          f"{prefix}/correct": correct,
          f"{prefix}/count": tf.cast(tf.shape(labels)[0], tf.float32)}


@dataclasses.dataclass
class StepContext:
  """What a per-replica step can touch.

  Attributes:
    network: the supernet; ``network(images, arch_weights, arch_indices,
      training=...)`` returns logits.
    arch: the α object.
    distribution: how the architecture sample is drawn.
    weight_optimizer, arch_optimizer: the two optimizers (built).
    global_batch_size: examples per step over all replicas; every loss is
      ``sum(per-example loss) / global_batch_size`` so that summing replica
      gradients gives the gradient of the global mean.
    label_smoothing: cross-entropy label smoothing.
    fixed_decisions: optional `tfnas.early_stop.ProgressiveEarlyStop`:
      decisions a single-path method no longer samples or updates.
  """
  network: Any
  arch: ArchParams
  distribution: ArchDistribution
  weight_optimizer: _Optimizer
  arch_optimizer: _Optimizer
  global_batch_size: int
  label_smoothing: float = 0.0
  fixed_decisions: Any = None

  @property
  def weight_variables(self) -> list:
    return list(self.network.trainable_variables)

  @property
  def arch_variables(self) -> list:
    return self.arch.variables_list

  def loss(self, logits, labels) -> tf.Tensor:
    """Cross-entropy summed over the local batch / global batch size."""
    per_example = cross_entropy(logits, labels, self.label_smoothing)
    return tf.reduce_sum(per_example) / tf.cast(self.global_batch_size,
                                               per_example.dtype)

  def forward(self, images, arch_weights, arch_indices=None, training=True,
              dropout=None):
    """The supernet's logits; ``dropout=None`` follows ``training``."""
    return self.network(images, arch_weights=arch_weights,
                        arch_indices=arch_indices, training=training,
                        dropout=dropout)

  @staticmethod
  def gradients(tape: tf.GradientTape, target, sources: Sequence):
    """``tape.gradient`` with zeros for sources the target does not use.

    The zeros are made here: ``UnconnectedGradients.ZERO`` fails inside a
    ``tf.function`` on an unused Keras 3 variable (whose ``dtype`` is a
    string), e.g. the preprocessing conv of a cell input no node reads.
    """
    sources = list(sources)
    grads = tape.gradient(target, sources)
    return [tf.zeros(s.shape, tf.as_dtype(s.dtype)) if g is None else g
            for s, g in zip(sources, grads)]

  @staticmethod
  def all_reduce(values: Sequence):
    """Sum over replicas (identity with one replica), in a fixed order."""
    return ordered_all_reduce(values)

  def apply_weights(self, grads) -> None:
    self.weight_optimizer.apply(grads, self.weight_variables)

  def apply_arch(self, grads) -> None:
    self.arch_optimizer.apply(grads, self.arch_variables)

  def metrics(self, prefix: str, loss, logits, labels) -> dict[str, tf.Tensor]:
    """Per-replica sums (`batch_sums`) of a step whose ``loss`` is the
    replica's share of the global-batch mean."""
    return batch_sums(prefix, loss * float(self.global_batch_size), logits,
                      labels)
