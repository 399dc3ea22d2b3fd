"""AuxiliaryHead: the auxiliary classifier tower of the evaluation networks.

Szegedy et al. (Inception); used with weight 0.4 by the DARTS and SNAS
evaluation recipes (SNAS appendix G.2/G.3), attached after the cell at 2/3 of
the depth (the second reduction cell).

    ReLU → avg-pool 5×5 (stride 3 for CIFAR, 2 for ImageNet, no padding)
         → 1×1 conv 128 → BN → ReLU → 2×2 conv 768 → [BN] → ReLU
         → global average → dense(num_classes)

On CIFAR (8×8 input) the 2×2 conv leaves 1×1, so the global average is a
plain flatten as in the reference networks. Smaller inputs (e.g. 2×2 for the
8×8 digits) shrink the pool window and the second conv to the available
size, so that the head works on any input. Its weights are excluded from the
parameter counts the papers report.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tfnas.layers.batch_norm import BatchNorm
from tfnas.layers.initializers import conv_kernel, torch_dense


@keras.saving.register_keras_serializable(package="tfnas")
class AuxiliaryHead(keras.layers.Layer):
  """Auxiliary classifier; ``[B, H, W, C] → [B, num_classes]`` logits.

  Args:
    num_classes: classifier outputs.
    pool_stride: stride of the 5×5 average pool (3: CIFAR, 2: ImageNet).
    second_batch_norm: BN after the 2×2 conv (CIFAR head: yes; the DARTS
      ImageNet head leaves it out).
    **kwargs: Forwarded to ``keras.layers.Layer``.
  """

  def __init__(self, num_classes: int, pool_stride: int = 3,
               second_batch_norm: bool = True, **kwargs):
    super().__init__(**kwargs)
    self.num_classes = num_classes
    self.pool_stride = pool_stride
    self.second_batch_norm = second_batch_norm
    self.conv1 = keras.layers.Conv2D(128, 1, use_bias=False,
                                     kernel_initializer=conv_kernel(),
                                     name="conv1")
    self.bn1 = BatchNorm(affine=True, name="bn1")
    self.conv2 = None  # Kernel size depends on the input size (build).
    self.bn2 = BatchNorm(affine=True, name="bn2") if second_batch_norm else None
    self.classifier = torch_dense(num_classes, 768, name="classifier")

  def build(self, input_shape):
    size = min(int(input_shape[1]), int(input_shape[2]))
    self._pool_size = min(5, size)
    pooled = (size - self._pool_size) // self.pool_stride + 1
    self.conv2 = keras.layers.Conv2D(768, min(2, pooled), use_bias=False,
                                     kernel_initializer=conv_kernel(),
                                     name="conv2")
    self.built = True

  def call(self, inputs, training=None):
    x = tf.nn.relu(inputs)
    x = tf.nn.avg_pool2d(x, self._pool_size, self.pool_stride, "VALID")
    x = tf.nn.relu(self.bn1(self.conv1(x), training=training))
    x = self.conv2(x)
    if self.bn2 is not None:
      x = self.bn2(x, training=training)
    x = tf.reduce_mean(tf.nn.relu(x), axis=[1, 2])
    return self.classifier(x)

  def get_config(self):
    config = super().get_config()
    config.update(num_classes=self.num_classes, pool_stride=self.pool_stride,
                  second_batch_norm=self.second_batch_norm)
    return config
