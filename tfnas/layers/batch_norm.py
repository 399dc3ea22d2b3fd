"""Batch normalisation with exact higher-order derivatives.

In training, NHWC float32 inputs take TensorFlow's fused kernel (one pass
forward and backward, ~2.6x faster than separate reductions on a CPU; its
registered second derivative is exact too); everything else (float64,
synchronized statistics across replicas, other ranks, and GPUs when op
determinism is on, where the fused gradient is not guaranteed reproducible)
computes the statistics with plain differentiable reductions.
"""

from __future__ import annotations

import contextlib
import functools

import keras
import tensorflow as tf

from tfnas.distribute import ordered_all_reduce

_SYNC_DEFAULT = [False]


@functools.cache
def _has_gpu() -> bool:
  return bool(tf.config.list_logical_devices("GPU"))


def _fused_kernel_allowed() -> bool:
  """Whether this process may use the fused kernel: always on CPUs; on GPUs
  only without op determinism (checked each call: it may be enabled late)."""
  if not _has_gpu():
    return True
  try:
    from tensorflow.python.framework import config  # pylint: disable=g-import-not-at-top
    return not config.is_op_determinism_enabled()
  except (ImportError, AttributeError):
    return False


@contextlib.contextmanager
def synchronized_batch_norm(enabled: bool = True):
  """Makes ``BatchNorm`` layers created inside synchronise across replicas.

  Networks are built from op factories that do not take BN options; this
  build-time default is captured by each layer (and saved in its config).
  """
  _SYNC_DEFAULT.append(bool(enabled))
  try:
    yield
  finally:
    _SYNC_DEFAULT.pop()


@keras.saving.register_keras_serializable(package="tfnas")
class BatchNorm(keras.layers.Layer):
  """Batch normalisation whose batch statistics are fully differentiable.

  ``keras.layers.BatchNormalization`` computes the variance with the gradient
  of the batch mean stopped, which leaves first derivatives right but makes
  second derivatives wrong. Hessian-based NAS methods need exact ones, so this
  layer computes the statistics with plain differentiable reductions.

  Statistics are taken over every axis but the last (N for rank 2, N, H, W for
  NHWC rank 4). Moving statistics follow the PyTorch convention:
  ``moving = (1 - momentum) * moving + momentum * batch``, with the unbiased
  batch variance; normalisation in training uses the biased one.

  Args:
    affine: Whether to learn a per-channel scale ``gamma`` and shift ``beta``.
    momentum: Weight of the current batch in the moving statistics.
    epsilon: Added to the variance for numerical stability.
    synchronized: Compute batch statistics over all replicas of a
      ``tf.distribute`` strategy (two all-reduces per call), so a
      multi-replica step equals the single-device step on the global batch.
      ``None`` takes the default set by :func:`synchronized_batch_norm`.
    **kwargs: Forwarded to ``keras.layers.Layer``.
  """

  def __init__(self, affine: bool = True, momentum: float = 0.1,
               epsilon: float = 1e-5, synchronized: bool | None = None,
               **kwargs):
    super().__init__(**kwargs)
    self.affine = affine
    self.synchronized = (_SYNC_DEFAULT[-1] if synchronized is None
                         else bool(synchronized))
    self.momentum = momentum
    self.epsilon = epsilon

  def build(self, input_shape):
    channels = input_shape[-1]
    if channels is None:
      raise ValueError(f"BatchNorm needs a known channel (last) dimension, "
                       f"got input shape {input_shape}")
    # autocast=False: under mixed precision the statistics stay in the
    # variable dtype (see call), so the weights must not be cast down.
    if self.affine:
      self.gamma = self.add_weight(shape=(channels,), initializer="ones",
                                   autocast=False, name="gamma")
      self.beta = self.add_weight(shape=(channels,), initializer="zeros",
                                  autocast=False, name="beta")
    self.moving_mean = self.add_weight(
        shape=(channels,), initializer="zeros", trainable=False,
        autocast=False, aggregation="mean", name="moving_mean")
    self.moving_variance = self.add_weight(
        shape=(channels,), initializer="ones", trainable=False,
        autocast=False, aggregation="mean", name="moving_variance")
    self.built = True

  def call(self, inputs, training=None):
    # Statistics in the variable dtype: float16 has too little range for them.
    x = tf.cast(inputs, self.variable_dtype)
    axes = list(range(x.shape.rank - 1))
    if training and self._fuses(x):
      return tf.cast(self._fused_training(x), self.compute_dtype)
    if training:
      mean, variance, count = self._batch_statistics(x, axes)
      centered = x - mean
      self._update_moving_stats(count, mean, variance)
    else:
      mean = tf.convert_to_tensor(self.moving_mean)
      variance = tf.convert_to_tensor(self.moving_variance)
      centered = x - mean
    outputs = centered * tf.math.rsqrt(variance + self.epsilon)
    if self.affine:
      outputs = outputs * self.gamma + self.beta
    return tf.cast(outputs, self.compute_dtype)

  def _across_replicas(self) -> bool:
    """Whether batch statistics are all-reduced over several replicas."""
    ctx = tf.distribute.get_replica_context()
    return (self.synchronized and ctx is not None and
            ctx.num_replicas_in_sync > 1)

  def _fuses(self, x) -> bool:
    return (x.shape.rank == 4 and x.dtype == tf.float32 and
            not self._across_replicas() and _fused_kernel_allowed())

  def _fused_training(self, x):
    return self.fused_training_with_reserve(x)[0]

  def fused_training_with_reserve(self, x):
    """Training-mode normalisation by the fused kernel (float32 NHWC), which
    also returns the batch mean and the unbiased batch variance (PyTorch's
    update, assigned here): ``(outputs, reserve)``, ``reserve`` being the
    kernel's three reserve spaces, what `fused_training_gradient` needs."""
    channels = x.shape[-1]
    if self.affine:
      scale, offset = (tf.convert_to_tensor(self.gamma),
                       tf.convert_to_tensor(self.beta))
    else:
      scale = tf.ones([channels], x.dtype)
      offset = tf.zeros([channels], x.dtype)
    empty = tf.constant([], x.dtype)
    outputs, mean, unbiased, *reserve = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=scale, offset=offset, mean=empty, variance=empty,
        epsilon=self.epsilon, exponential_avg_factor=1.0,
        data_format="NHWC", is_training=True)
    self._assign_moving_stats(mean, unbiased)
    return outputs, reserve

  def fused_training_gradient(self, x, scale, reserve, dy):
    """``(dx, d_scale, d_offset)`` of `fused_training_with_reserve` at input
    ``x`` with scale value ``scale`` (ones when not affine), from its
    ``reserve``: the kernel TF's registered gradient calls, without
    running the forward kernel again."""
    dx, d_scale, d_offset, _, _ = tf.raw_ops.FusedBatchNormGradV3(
        y_backprop=dy, x=x, scale=scale, reserve_space_1=reserve[0],
        reserve_space_2=reserve[1], reserve_space_3=reserve[2],
        epsilon=self.epsilon, data_format="NHWC", is_training=True)
    return dx, d_scale, d_offset

  def _batch_statistics(self, x, axes):
    """Mean, biased variance and element count per channel (two-pass)."""
    count = tf.cast(tf.size(x) // tf.shape(x)[-1], x.dtype)
    if self._across_replicas():
      total, count = ordered_all_reduce([tf.reduce_sum(x, axis=axes),
                                         tf.reshape(count, [1])])
      count = count[0]
      mean = total / count
      (squares,) = ordered_all_reduce(
          [tf.reduce_sum(tf.square(x - mean), axis=axes)])
      return mean, squares / count, count
    mean = tf.reduce_mean(x, axis=axes)
    variance = tf.reduce_mean(tf.square(x - mean), axis=axes)
    return mean, variance, count

  def _update_moving_stats(self, count, mean, variance):
    # PyTorch stores the unbiased variance; guard n == 1 against division by 0.
    unbiased = variance * count / tf.maximum(count - 1.0, 1.0)
    self._assign_moving_stats(mean, unbiased)

  def _assign_moving_stats(self, mean, unbiased):
    mean = tf.stop_gradient(mean)
    unbiased = tf.stop_gradient(unbiased)
    m = self.momentum
    self.moving_mean.assign((1.0 - m) * self.moving_mean + m * mean)
    self.moving_variance.assign(
        (1.0 - m) * self.moving_variance + m * unbiased)

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    config = super().get_config()
    config.update(affine=self.affine, momentum=self.momentum,
                  epsilon=self.epsilon, synchronized=self.synchronized)
    return config


def batch_norm_layers(model) -> list[BatchNorm]:
  """Every ``BatchNorm`` inside ``model``."""
  return [layer for layer in model._flatten_layers()  # pylint: disable=protected-access
          if isinstance(layer, BatchNorm)]


def batch_norm_parameters(model) -> list:
  """The scales and shifts of every affine ``BatchNorm`` inside ``model``."""
  return [w for layer in batch_norm_layers(model)
          for w in layer.trainable_weights]
