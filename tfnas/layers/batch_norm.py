"""Batch normalisation with exact higher-order derivatives."""

from __future__ import annotations

import keras
import tensorflow as tf


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
    **kwargs: Forwarded to ``keras.layers.Layer``.
  """

  def __init__(self, affine: bool = True, momentum: float = 0.1,
               epsilon: float = 1e-5, **kwargs):
    super().__init__(**kwargs)
    self.affine = affine
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
        autocast=False, name="moving_mean")
    self.moving_variance = self.add_weight(
        shape=(channels,), initializer="ones", trainable=False,
        autocast=False, name="moving_variance")
    self.built = True

  def call(self, inputs, training=None):
    # Statistics in the variable dtype: float16 has too little range for them.
    x = tf.cast(inputs, self.variable_dtype)
    axes = list(range(x.shape.rank - 1))
    if training:
      mean = tf.reduce_mean(x, axis=axes)
      centered = x - mean
      variance = tf.reduce_mean(tf.square(centered), axis=axes)
      self._update_moving_stats(x, mean, variance)
    else:
      mean = tf.convert_to_tensor(self.moving_mean)
      variance = tf.convert_to_tensor(self.moving_variance)
      centered = x - mean
    outputs = centered * tf.math.rsqrt(variance + self.epsilon)
    if self.affine:
      outputs = outputs * self.gamma + self.beta
    return tf.cast(outputs, self.compute_dtype)

  def _update_moving_stats(self, x, mean, variance):
    # PyTorch stores the unbiased variance; guard n == 1 against division by 0.
    count = tf.cast(tf.size(x) // tf.shape(x)[-1], x.dtype)
    unbiased = variance * count / tf.maximum(count - 1.0, 1.0)
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
                  epsilon=self.epsilon)
    return config
