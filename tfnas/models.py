"""Evaluation networks built from a genotype (DARTS section 3.2, SNAS 3.2).

* :class:`NetworkCIFAR` -- 3×3 conv stem (3C channels), ``num_cells`` cells
  with reduction cells at 1/3 and 2/3 of the depth, global average pooling,
  a linear classifier. DARTS/SNAS CIFAR-10: 20 cells, C = 36.
* :class:`NetworkImageNet` -- the mobile setting: two stride-2 conv stems and
  one more stride-2 stem (224 → 28), 14 cells, C = 48.

Both take NORMALISED images (``(x / 255 - mean) / std``, see
``tfnas.data``) and return logits; in training with an auxiliary head they
return ``(logits, aux_logits)``. The auxiliary head sits after the cell at
2/3 depth. Drop-path probability lives in the non-trainable weight
``drop_path_prob`` (the retraining loop raises it linearly over epochs); the
per-step randomness comes from ``drop_seed``, an int ``[2]`` tensor.
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from tfnas.genotype import Genotype
from tfnas.layers.auxiliary_head import AuxiliaryHead
from tfnas.layers.batch_norm import BatchNorm
from tfnas.layers.cell import one_pixel_cells_warning, reduction_layers
from tfnas.layers.derived_cell import DerivedCell
from tfnas.layers.initializers import conv_kernel, torch_dense

NETWORKS = ("cifar", "imagenet")


class _EvalNetwork(keras.Model):
  """Cells, auxiliary head and classifier shared by both networks."""

  def __init__(self, genotype: Genotype | dict, num_classes: int,
               num_cells: int, channels: int, auxiliary: bool,
               stem_channels: int, stem_reduced: bool, aux_pool_stride: int,
               aux_second_batch_norm: bool, **kwargs):
    super().__init__(**kwargs)
    if isinstance(genotype, dict):  # From get_config.
      genotype = Genotype.from_dict(genotype)
    if num_cells < 1 or channels < 2 or channels % 2:
      raise ValueError(f"need num_cells >= 1 and an even channels >= 2, got "
                       f"num_cells={num_cells}, channels={channels}")
    self.genotype = genotype
    self.num_classes = num_classes
    self.num_cells = num_cells
    self.channels = channels
    self.auxiliary = auxiliary
    self.reduction_layers = reduction_layers(num_cells)
    self.aux_position = 2 * num_cells // 3
    c_pp, c_p, c_cur = stem_channels, stem_channels, channels
    reduction_prev = stem_reduced
    self.cells = []
    aux_channels = None
    for i in range(num_cells):
      reduction = i in self.reduction_layers
      if reduction:
        c_cur *= 2
      cell = DerivedCell(genotype.reduce if reduction else genotype.normal,
                         c_pp, c_p, c_cur, reduction, reduction_prev,
                         name=f"cell_{i}_{'reduce' if reduction else 'normal'}")
      self.cells.append(cell)
      # A TF checkpoint dependency of its own (see DerivedCell).
      setattr(self, f"cell_{i}", cell)
      reduction_prev = reduction
      c_pp, c_p = c_p, cell.output_channels
      if i == self.aux_position:
        aux_channels = c_p
    self.output_channels = c_p
    self.auxiliary_head = None
    if auxiliary:
      self.auxiliary_head = AuxiliaryHead(
          num_classes, pool_stride=aux_pool_stride,
          second_batch_norm=aux_second_batch_norm, name="auxiliary_head")
    self.aux_channels = aux_channels
    self.classifier = torch_dense(num_classes, c_p, name="classifier")
    self.drop_path_prob = self.add_weight(
        shape=(), initializer="zeros", trainable=False, name="drop_path_prob")

  def build(self, input_shape):
    self.built = True

  def _stem(self, images, training):
    raise NotImplementedError

  def call(self, images, training=None, drop_seed=None):
    s0, s1 = self._stem(images, training)
    aux_logits = None
    drop_prob = self.drop_path_prob
    for i, cell in enumerate(self.cells):
      seed = (None if drop_seed is None else
              tf.random.experimental.stateless_fold_in(drop_seed, i))
      s0, s1 = s1, cell(s0, s1, drop_prob=drop_prob, seed=seed,
                        training=training)
      if (training and i == self.aux_position
          and self.auxiliary_head is not None):
        aux_logits = self.auxiliary_head(s1, training=training)
    logits = self.classifier(tf.reduce_mean(s1, axis=[1, 2]))
    if aux_logits is not None:
      return logits, aux_logits
    return logits

  def auxiliary_weights(self) -> list:
    """Weights of the auxiliary head (empty without one)."""
    return [] if self.auxiliary_head is None else list(
        self.auxiliary_head.weights)

  def count_params_without_auxiliary(self) -> int:
    """Trainable parameters outside the auxiliary head (what papers report)."""
    aux = {id(v) for v in self.auxiliary_weights()}
    return int(sum(int(tf.size(v.value)) for v in self.trainable_weights
                   if id(v) not in aux))

  def get_config(self):
    config = super().get_config()
    config.update(genotype=self.genotype.to_dict(),
                  num_classes=self.num_classes, num_cells=self.num_cells,
                  channels=self.channels, auxiliary=self.auxiliary)
    return config


@keras.saving.register_keras_serializable(package="tfnas")
class NetworkCIFAR(_EvalNetwork):
  """The CIFAR evaluation network (DARTS fig. / SNAS G.2).

  ``call(images, training=None, drop_seed=None)``: images ``[B, H, W, c]``
  normalised; returns ``[B, num_classes]`` logits (and the auxiliary logits
  in training when ``auxiliary``).

  Args:
    genotype: the derived architecture.
    num_classes: classifier outputs.
    num_cells: cells (20 in the papers).
    channels: initial channels C (36 in the papers).
    auxiliary: build the auxiliary head.
    stem_multiplier: the stem outputs ``stem_multiplier * C`` channels.
  """

  def __init__(self, genotype, num_classes: int = 10, num_cells: int = 20,
               channels: int = 36, auxiliary: bool = True,
               stem_multiplier: int = 3, **kwargs):
    super().__init__(genotype, num_classes, num_cells, channels, auxiliary,
                     stem_channels=stem_multiplier * channels,
                     stem_reduced=False, aux_pool_stride=3,
                     aux_second_batch_norm=True, **kwargs)
    self.stem_multiplier = stem_multiplier
    self.stem_conv = keras.layers.Conv2D(stem_multiplier * channels, 3,
                                         padding="same", use_bias=False,
                                         kernel_initializer=conv_kernel(),
                                         name="stem_conv")
    self.stem_bn = BatchNorm(affine=True, name="stem_bn")

  def _stem(self, images, training):
    s = self.stem_bn(self.stem_conv(images), training=training)
    return s, s

  def get_config(self):
    config = super().get_config()
    config.update(stem_multiplier=self.stem_multiplier)
    return config


def _stride2_conv(channels, name):
  # PyTorch padding=1 with stride 2: pad symmetrically, convolve 'valid'.
  return keras.layers.Conv2D(channels, 3, strides=2, padding="valid",
                             use_bias=False, kernel_initializer=conv_kernel(),
                             name=name)


def _pad1(x):
  return tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])


@keras.saving.register_keras_serializable(package="tfnas")
class NetworkImageNet(_EvalNetwork):
  """The ImageNet mobile-setting network (DARTS section 3.3, SNAS G.3).

  Stem 0: conv 3×3/2 (C/2) → BN → ReLU → conv 3×3/2 (C) → BN; stem 1:
  ReLU → conv 3×3/2 (C) → BN. 224×224 input reaches the cells at 28×28; the
  first cell sees the stem-0 output (56×56) as ``s0``, hence a
  FactorizedReduce there. Same call contract as :class:`NetworkCIFAR`.

  Args:
    genotype: the derived architecture.
    num_classes: classifier outputs (1000).
    num_cells: cells (14).
    channels: initial channels C (48).
    auxiliary: build the auxiliary head.
  """

  def __init__(self, genotype, num_classes: int = 1000, num_cells: int = 14,
               channels: int = 48, auxiliary: bool = True, **kwargs):
    super().__init__(genotype, num_classes, num_cells, channels, auxiliary,
                     stem_channels=channels, stem_reduced=True,
                     aux_pool_stride=2, aux_second_batch_norm=False,
                     **kwargs)
    self.stem0_conv1 = _stride2_conv(channels // 2, "stem0_conv1")
    self.stem0_bn1 = BatchNorm(affine=True, name="stem0_bn1")
    self.stem0_conv2 = _stride2_conv(channels, "stem0_conv2")
    self.stem0_bn2 = BatchNorm(affine=True, name="stem0_bn2")
    self.stem1_conv = _stride2_conv(channels, "stem1_conv")
    self.stem1_bn = BatchNorm(affine=True, name="stem1_bn")

  def _stem(self, images, training):
    x = self.stem0_bn1(self.stem0_conv1(_pad1(images)), training=training)
    x = tf.nn.relu(x)
    s0 = self.stem0_bn2(self.stem0_conv2(_pad1(x)), training=training)
    s1 = self.stem1_bn(self.stem1_conv(_pad1(tf.nn.relu(s0))),
                       training=training)
    return s0, s1


def size_warnings(kind: str, image_size: int,
                  num_cells: int | None = None) -> list[str]:
  """Valid but ill-suited pairings of an evaluation network and an input
  size: the ImageNet network (8x down in its stems, 32x by its last cells)
  on small images, whose cells then see a few pixels or one; the CIFAR
  network (stride-1 stem) on ImageNet-size images, whose first cells run at
  full resolution, and (given ``num_cells``) on images so small that cells
  see 1×1 feature maps."""
  side = f"{image_size}x{image_size}"
  if kind == "cifar" and num_cells:
    warning = one_pixel_cells_warning(num_cells, image_size)
    if warning:
      return [f"--network=cifar {warning}"]
  if kind == "imagenet" and image_size < 32:
    first = max(-(-image_size // 8), 1)
    return [f"--network=imagenet shrinks {side} inputs to {first}x{first} "
            "before its first cell and to 1x1 by its last; --network=cifar "
            "(stride-1 stem) suits images this small"]
  if kind == "cifar" and image_size >= 128:
    return [f"--network=cifar runs its first cells on the full {side} "
            "inputs (stride-1 stem): slow and memory-hungry; "
            "--network=imagenet (8x down in its stems) is the ImageNet "
            "recipe"]
  return []


def build_network(kind: str, genotype: Genotype,
                  input_shape: Sequence[int], num_classes: int,
                  num_cells: int, channels: int,
                  auxiliary: bool = True) -> _EvalNetwork:
  """Builds an evaluation network and creates its variables.

  One eager call on a batch of one image creates every variable (the
  auxiliary head too, with ``training=True``); batch statistics of that call
  do not touch the moving averages because it runs in a StatelessScope.

  Args:
    kind: ``"cifar"`` or ``"imagenet"``.
    genotype: the derived architecture.
    input_shape: ``(H, W, C)`` of one image.
    num_classes, num_cells, channels, auxiliary: network shape.

  Returns:
    The built network.
  """
  if kind not in NETWORKS:
    raise ValueError(f"unknown network {kind!r}; known: {NETWORKS}")
  cls = NetworkCIFAR if kind == "cifar" else NetworkImageNet
  net = cls(genotype, num_classes=num_classes, num_cells=num_cells,
            channels=channels, auxiliary=auxiliary, name=f"network_{kind}")
  dummy = tf.zeros([2, *input_shape])
  with keras.StatelessScope():
    net(dummy, training=True)
  net(dummy, training=False)
  return net
