"""The ShuffleNetV2 single-path search space of SPOS and DSNAS.

DSNAS section 4.2: a parent network of 20 choice blocks, four candidates each
(``choice_3``, ``choice_5``, ``choice_7``, ``choice_x``), 4^20 single-path
children. The layout follows the official DSNAS code
(``SNAS-Series/DSNAS/network.py``, ``ShuffleNetV2_OneShot``): stem 3×3/2 conv
(16) → BN → ReLU; stages of 4, 4, 8, 4 blocks with 64, 160, 320, 640 channels,
the first block of each stage at stride 2; 1×1 conv to 1024 → BN → ReLU;
global average pool; dropout 0.1; linear classifier without bias. There is
no max-pool after the stem (224 → 112 → 56, 28, 14, 7, matching its
``AvgPool2d(7)`` and its FLOPs table, which is computed at 112×112 for block
0); ``stem_pool`` adds the ShuffleNetV2 one if wanted.

The architecture is a call argument (DESIGN.md): one decision group
``blocks`` of shape ``[num_blocks, num_choices]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf

from tfnas import eager_cache, ops
from tfnas.arch import DecisionGroup
from tfnas.layers.batch_norm import BatchNorm, synchronized_batch_norm
from tfnas.layers.choice_block import SHUFFLENET_CHOICES, ChoiceBlock
from tfnas.layers.initializers import conv_kernel, spos_dense

GROUP = "blocks"


@dataclasses.dataclass(frozen=True)
class ShuffleNetSpaceConfig:
  """Shape of a ShuffleNetV2 single-path supernet.

  Defaults are the ImageNet space of SPOS/DSNAS (20 blocks, 224×224 input);
  `small` gives a preset for 8×8–32×32 inputs.

  Attributes:
    stage_repeats: blocks per stage; the first of each stage has stride 2.
    stage_channels: output channels of each stage (even, increasing).
    stem_channels: output channels of the stem conv.
    head_channels: channels of the final 1×1 conv.
    input_size: nominal input height/width (used by the builder's default).
    num_classes: classifier outputs.
    dropout: dropout rate before the classifier.
    choices: candidate names, the columns of the ``blocks`` logits.
    stem_stride: stride of the stem conv (2 for ImageNet, 1 for tiny inputs).
    stem_pool: add a 3×3/2 max-pool after the stem (ShuffleNetV2 has one;
      the SPOS/DSNAS supernet does not).
    mid_channels_ratio: main-branch middle width as a fraction of the block's
      output channels (SPOS: 0.5).
    sync_batch_norm: batch statistics over all replicas.
    shared_functions: single-path candidates run as shared traced functions
      (see `ChoiceBlock`); False runs every layer inline.
  """
  stage_repeats: tuple[int, ...] = (4, 4, 8, 4)
  stage_channels: tuple[int, ...] = (64, 160, 320, 640)
  stem_channels: int = 16
  head_channels: int = 1024
  input_size: int = 224
  num_classes: int = 1000
  dropout: float = 0.1
  choices: tuple[str, ...] = SHUFFLENET_CHOICES
  stem_stride: int = 2
  stem_pool: bool = False
  mid_channels_ratio: float = 0.5
  sync_batch_norm: bool = False
  shared_functions: bool = True

  def __post_init__(self):
    # Lists from JSON or flags become tuples so the config stays hashable.
    for field in ("stage_repeats", "stage_channels", "choices"):
      object.__setattr__(self, field, tuple(getattr(self, field)))
    if not self.stage_repeats or len(self.stage_repeats) != len(
        self.stage_channels):
      raise ValueError(f"stage_repeats {self.stage_repeats} and "
                       f"stage_channels {self.stage_channels} must be "
                       f"non-empty and of equal length")
    bad = [r for r in self.stage_repeats if r < 1]
    if bad:
      raise ValueError(f"stage_repeats must all be >= 1, got "
                       f"{self.stage_repeats}")
    for field in ("stem_channels", "head_channels", "input_size",
                  "num_classes"):
      if getattr(self, field) < 1:
        raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
    prev = self.stem_channels
    for s, c in enumerate(self.stage_channels):
      # Stride-1 blocks split channels in halves; stride-2 blocks must widen
      # (their main branch outputs c - prev channels).
      if c % 2 or c <= prev:
        raise ValueError(f"stage_channels[{s}] = {c} must be even and greater "
                         f"than the previous width {prev} (stage_channels="
                         f"{self.stage_channels}, stem_channels="
                         f"{self.stem_channels})")
      prev = c
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
    unknown = [c for c in self.choices if c not in SHUFFLENET_CHOICES]
    if unknown or not self.choices or len(set(self.choices)) != len(
        self.choices):
      raise ValueError(f"choices must be distinct names from "
                       f"{SHUFFLENET_CHOICES}, got {self.choices}")
    if self.stem_stride not in (1, 2):
      raise ValueError(f"stem_stride must be 1 or 2, got {self.stem_stride}")
    if not 0.0 < self.mid_channels_ratio:
      raise ValueError(f"mid_channels_ratio must be > 0, got "
                       f"{self.mid_channels_ratio}")

  @classmethod
  def small(cls, **overrides) -> "ShuffleNetSpaceConfig":
    """A 5-block preset for 8×8–32×32 inputs (CIFAR, digits).

    Stem at stride 1 and no pool, so 32×32 inputs reach 2×2 after the four
    stride-2 stages; 4^5 = 1024 children.
    """
    kwargs = dict(stage_repeats=(1, 1, 2, 1), stage_channels=(16, 32, 64, 128),
                  stem_channels=8, head_channels=128, input_size=32,
                  num_classes=10, stem_stride=1)
    kwargs.update(overrides)
    return cls(**kwargs)

  @property
  def num_blocks(self) -> int:
    return sum(self.stage_repeats)

  def blocks(self) -> tuple[tuple[int, int, int], ...]:
    """``(in_channels, out_channels, stride)`` of every block, in order."""
    out = []
    c_in = self.stem_channels
    for repeats, c_out in zip(self.stage_repeats, self.stage_channels):
      for i in range(repeats):
        out.append((c_in, c_out, 2 if i == 0 else 1))
        c_in = c_out
    return tuple(out)

  def mid_channels(self, out_channels: int) -> int:
    return max(1, int(out_channels * self.mid_channels_ratio))

  def warnings(self) -> list[str]:
    """Valid settings under which a search in this space learns less than it
    appears to: most blocks seeing 1×1 inputs (the 224-pixel design on tiny
    images), where their k×k depthwise convs see only padding and the
    kernel-size choices hardly differ."""
    sizes = block_input_sizes(self)
    tiny = sum(size == 1 for size in sizes)
    if tiny * 2 <= len(sizes):
      return []
    # The small preset only where it would not be warned of itself.
    small = block_input_sizes(ShuffleNetSpaceConfig.small(
        input_size=self.input_size))
    gentler = ("shufflenet_small, or " if small.count(1) * 2 <= len(small)
               else "")
    return [f"on {self.input_size}×{self.input_size} inputs {tiny} of its "
            f"{len(sizes)} blocks get 1×1 feature maps, where the kernel-size "
            f"choices hardly differ; use a space with fewer stride-2 stages "
            f"({gentler}--stage_repeats/--stage_channels) or larger inputs"]

  def decision_groups(self) -> list[DecisionGroup]:
    """One group ``blocks``: a decision per block over ``choices``."""
    return [DecisionGroup(GROUP, self.choices, self.num_blocks,
                          decision="block")]


@keras.saving.register_keras_serializable(package="tfnas")
class ShuffleNetSupernet(keras.Model):
  """The SPOS/DSNAS single-path supernet (DSNAS section 4.2).

  ``call(images, arch_weights=None, arch_indices=None, training=None,
  dropout=None)``:
    images: ``[B, H, W, 3]`` float.
    arch_indices: ``{"blocks": ints}``, one index into ``choices`` per block:
      single path, only those candidates run and are traced. With it,
      ``arch_weights["blocks"]`` (``[num_blocks, num_choices]``, e.g. a hard
      one-hot sample) supplies the gates ``arch_weights["blocks"][b, index]``
      (DSNAS's dummy 1). An int32 ``[num_blocks]`` tensor instead chooses at
      run time (`ChoiceBlock`'s switched single path): one traced graph
      serves every child.
    arch_weights: alone, ``{"blocks": [num_blocks, num_choices]}`` mixes every
      candidate of every block (SNAS-style).
    dropout: whether the dropout before the classifier is active; None
      follows ``training``. ``training=True, dropout=False`` evaluates with
      batch statistics in BN and no dropout.
  Returns ``[B, num_classes]`` logits.

  Args:
    space: the space config.
    block_choices: optional candidate name per block: block b then holds
      only that candidate (a derived child, `tfnas.child`); indices refer
      to the one-element choice lists, i.e. are all 0.
  """

  def __init__(self, space: ShuffleNetSpaceConfig,
               block_choices: Sequence[str] | None = None, **kwargs):
    super().__init__(**kwargs)
    self.space = space
    if block_choices is not None:
      block_choices = tuple(block_choices)
      if len(block_choices) != space.num_blocks:
        raise ValueError(f"block_choices has {len(block_choices)} entries, "
                         f"expected {space.num_blocks}: {block_choices}")
    self.block_choices = block_choices
    with synchronized_batch_norm(space.sync_batch_norm):
      self._create_layers(space)

  def _create_layers(self, space):
    self.stem_conv = keras.layers.Conv2D(
        space.stem_channels, 3, strides=space.stem_stride,
        padding="same" if space.stem_stride == 1 else "valid", use_bias=False,
        kernel_initializer=keras.initializers.RandomNormal(0.0, 0.01),
        name="stem_conv")
    self.stem_bn = BatchNorm(name="stem_bn")
    self.stem_pool = (ops.Pool("max", 3, 2, name="stem_pool")
                      if space.stem_pool else None)
    self.blocks = [
        ChoiceBlock(c_in, c_out, stride,
                    space.choices if self.block_choices is None
                    else (self.block_choices[b],),
                    mid_channels=space.mid_channels(c_out),
                    shared_functions=space.shared_functions, name=f"block_{b}")
        for b, (c_in, c_out, stride) in enumerate(space.blocks())]
    self.head_conv = keras.layers.Conv2D(space.head_channels, 1,
                                         use_bias=False,
                                         kernel_initializer=conv_kernel("spos"),
                                         name="head_conv")
    self.head_bn = BatchNorm(name="head_bn")
    self.pool = keras.layers.GlobalAveragePooling2D(name="global_pool")
    self.dropout = keras.layers.Dropout(space.dropout, name="dropout")
    # No bias, as in the official DSNAS/SPOS classifier.
    self.classifier = spos_dense(space.num_classes, name="classifier")

  def build(self, input_shape):
    self.built = True

  def call(self, images, arch_weights=None, arch_indices=None, training=None,
           dropout=None):
    weights = None if arch_weights is None else arch_weights.get(GROUP)
    indices = None if arch_indices is None else arch_indices.get(GROUP)
    if indices is None and weights is None and self.block_choices is not None:
      indices = (0,) * self.space.num_blocks  # A child has one architecture.
    if indices is None and weights is None:
      keys = None if arch_weights is None else list(arch_weights)
      raise ValueError(f"ShuffleNetSupernet needs arch_indices[{GROUP!r}] "
                       f"(single path) or arch_weights[{GROUP!r}] (mixed); "
                       f"got arch_indices={arch_indices}, "
                       f"arch_weights keys={keys}")
    n = self.space.num_blocks
    switched = isinstance(indices, (tf.Tensor, tf.Variable))
    if switched:
      if (not indices.dtype.is_integer or indices.shape.rank != 1 or
          indices.shape[0] not in (None, n)):
        raise ValueError(f"arch_indices[{GROUP!r}] as a tensor must be a "
                         f"[{n}] integer vector (one index per block), got "
                         f"{indices.dtype.name} of shape {indices.shape}")
    elif indices is not None and len(indices) != n:
      raise ValueError(f"arch_indices[{GROUP!r}] has {len(indices)} entries, "
                       f"expected one per block ({n}): {tuple(indices)}")
    if weights is not None and self.block_choices is not None:
      raise ValueError("a ShuffleNetSupernet with block_choices runs single "
                       "path only (arch_indices of zeros, no arch_weights)")
    if weights is not None and tuple(weights.shape) != (
        n, len(self.space.choices)):
      raise ValueError(f"arch_weights[{GROUP!r}] has shape "
                       f"{tuple(weights.shape)}, expected "
                       f"{(n, len(self.space.choices))}")

    if switched:  # One op, not one per block.
      indices = tf.unstack(tf.cast(indices, tf.int32), num=n)
    x = images
    if self.space.stem_stride != 1:
      x = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])  # Symmetric, as PyTorch.
    x = tf.nn.relu(self.stem_bn(self.stem_conv(x), training=training))
    if self.stem_pool is not None:
      x = self.stem_pool(x)
    for b, block in enumerate(self.blocks):
      if switched:
        k = indices[b]
        gate = None if weights is None else tf.gather(weights[b], k)
        x = block(x, index=k, gate=gate, training=training)
      elif indices is not None:
        k = int(indices[b])
        gate = None if weights is None else weights[b, k]
        x = block(x, index=k, gate=gate, training=training)
      else:
        x = block(x, weights=weights[b], training=training)
    x = tf.nn.relu(self.head_bn(self.head_conv(x), training=training))
    x = self.dropout(self.pool(x),
                     training=training if dropout is None else dropout)
    return self.classifier(x)

  def get_config(self):
    config = super().get_config()
    config.update(space=dataclasses.asdict(self.space),
                  block_choices=(None if self.block_choices is None
                                 else list(self.block_choices)))
    return config

  @classmethod
  def from_config(cls, config):
    config = dict(config)  # Leave the caller's dict intact.
    space = config.pop("space")
    return cls(ShuffleNetSpaceConfig(**space), **config)

  @property
  def weight_variables(self) -> list:
    """Trainable network weights (never α)."""
    return self.trainable_variables

  def choice_variables(self) -> list[tuple[Any, str, int, int]]:
    """``(variable, group, decision, candidate)`` for every trainable
    variable of one candidate of one block: a single-path child uses it only
    when that block picks that candidate. The stem, head and classifier are
    used by every child."""
    out = []
    for b, block in enumerate(self.blocks):
      for k, name in enumerate(block.choices):
        out.extend((v, GROUP, b, k)
                   for v in block.candidates[name].trainable_variables)
    return out


def build_shufflenet_supernet(space: ShuffleNetSpaceConfig,
                              input_shape: Sequence[int] | None = None,
                              name: str = "supernet") -> ShuffleNetSupernet:
  """Builds the supernet and creates every candidate's variables eagerly.

  Single-path calls build only the candidates they use, so one eager call in
  mixed mode (uniform weights, 1-image batch, inference BN) creates all
  variables up front: none may be created later inside ``tf.function``
  tracing, and checkpoints must see the full set from the start.

  Args:
    space: the space config.
    input_shape: ``(H, W, C)``; defaults to ``(input_size, input_size, 3)``.
    name: model name.

  Returns:
    A built `ShuffleNetSupernet`.
  """
  if input_shape is None:
    input_shape = (space.input_size, space.input_size, 3)
  net = ShuffleNetSupernet(space, name=name)
  k = len(space.choices)
  uniform = tf.fill([space.num_blocks, k], 1.0 / k)
  net(tf.zeros([1, *input_shape]), arch_weights={GROUP: uniform},
      training=False)
  eager_cache.release_build_kernels()
  return net


def block_input_sizes(space: ShuffleNetSpaceConfig,
                      image_size: int | None = None) -> list[int]:
  """Spatial size of the input of every searchable block, in order."""
  size = -(-(image_size or space.input_size) // space.stem_stride)
  if space.stem_pool:
    size = -(-size // 2)
  sizes = []
  for _, _, stride in space.blocks():
    sizes.append(size)
    size = -(-size // stride)
  return sizes


def network_flops(space: ShuffleNetSpaceConfig, choices: Sequence[int],
                  image_size: int | None = None, in_channels: int = 3) -> int:
  """Multiply-adds of one image through the child with ``choices`` (indices
  into ``space.choices``): stem conv, the chosen candidates, head conv and
  classifier (BN, ReLU, pooling not counted)."""
  size = image_size or space.input_size
  stem = -(-size // space.stem_stride)
  total = stem * stem * 9 * in_channels * space.stem_channels
  table = block_costs(space, size)
  total += sum(table[b, int(k), 1] for b, k in enumerate(choices))
  last_stride = space.blocks()[-1][2]
  last = -(-block_input_sizes(space, size)[-1] // last_stride)
  total += last * last * space.stage_channels[-1] * space.head_channels
  total += space.head_channels * space.num_classes
  return int(total)


def _spec_cost(spec, size: int, in_channels: int) -> tuple[int, int]:
  """(params, multiply-adds) of a `_ConvBNStack` spec on ``size``×``size``
  inputs.

  Convolution weights and BN scale/shift count as parameters; FLOPs are the
  convolutions' multiply-adds (BN and ReLU are not counted), as in the
  official SPOS/DSNAS FLOPs table.
  """
  params = flops = 0
  c = in_channels
  for unit in spec:
    if unit[0] == "dw":
      _, k, stride = unit
      size = -(-size // stride)
      params += k * k * c + 2 * c
      flops += size * size * k * k * c
    else:
      out = unit[1]
      params += c * out + 2 * out
      flops += size * size * c * out
      c = out
  return params, flops


def block_costs(space: ShuffleNetSpaceConfig, image_size: int | None = None
                ) -> np.ndarray:
  """Analytic ``[num_blocks, num_choices, 2]`` (params, FLOPs) per candidate.

  FLOPs are multiply-adds of a candidate's own convs (main branch, and at
  stride 2 its projection branch) for one image of ``image_size`` (default
  ``space.input_size``); e.g. block 0 of the ImageNet space costs 13 396 992
  (``choice_3``) and 15 805 440 (``choice_5``), the official table's values.
  """
  from tfnas.layers.choice_block import CHOICE_KERNELS, choice_branch_spec
  table = np.zeros((space.num_blocks, len(space.choices), 2))
  for b, ((c_in, c_out, stride), size) in enumerate(
      zip(space.blocks(), block_input_sizes(space, image_size))):
    branch_in = c_in // 2 if stride == 1 else c_in
    mid = space.mid_channels(c_out)
    for k, choice in enumerate(space.choices):
      spec = choice_branch_spec(choice, branch_in, mid, c_out - branch_in,
                                stride)
      params, flops = _spec_cost(spec, size, branch_in)
      if stride == 2:
        p, f = _spec_cost((("dw", CHOICE_KERNELS[choice], 2),
                              ("pw", branch_in)), size, branch_in)
        params, flops = params + p, flops + f
      table[b, k] = params, flops
  return table
