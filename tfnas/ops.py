"""Candidate operations of the cell search spaces and their registry.

Every op maps ``[B, H, W, C]`` to ``[B, ceil(H/s), ceil(W/s), C]`` for stride
``s``. Convolutional ops follow the DARTS ReLU-Conv-BN order, use no conv
bias, and pad symmetrically like the PyTorch reference code. TF's own 'SAME'
padding is asymmetric for stride 2 on even sizes, so strided ops either pad
explicitly and convolve 'valid', or compute at stride 1 and subsample (which
is the same thing for symmetric padding).

The registry ``OPS`` maps an op name to a factory
``(channels, stride, affine, **layer_kwargs) -> keras.layers.Layer``.
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Callable

import keras
import tensorflow as tf

from tfnas.layers.batch_norm import BatchNorm
from tfnas.layers.initializers import conv_kernel

OpFactory = Callable[..., keras.layers.Layer]

OPS: dict[str, OpFactory] = {}

# Candidate order of the DARTS search space (index k ↔ alpha column k).
DARTS_OPS = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
             "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
OP_NAMES = DARTS_OPS


class UnknownOpError(KeyError, ValueError):
  """Raised by `get_op` for an unregistered name; catchable as either type."""

  def __str__(self):
    # KeyError.__str__ would repr() the message, quoting it.
    return str(self.args[0]) if self.args else ""


def register_op(name: str, factory: OpFactory | None = None):
  """Registers an op factory under ``name``.

  Usable directly, ``register_op("my_op", factory)``, or as a decorator,
  ``@register_op("my_op")``. A factory is called as
  ``factory(channels, stride, affine)``; if it also accepts ``name`` (or
  ``**kwargs``), `get_op` passes the layer name through.

  Args:
    name: Op name; must not be registered yet.
    factory: The factory; omit to get a decorator.

  Returns:
    The factory, or a decorator registering and returning it.

  Raises:
    ValueError: If ``name`` is already registered.
  """

  def decorator(fn: OpFactory) -> OpFactory:
    if name in OPS:
      raise ValueError(f"op {name!r} is already registered")
    OPS[name] = fn
    return fn

  return decorator if factory is None else decorator(factory)


def _accepts_name(factory: OpFactory) -> bool:
  try:
    params = inspect.signature(factory).parameters.values()
  except (TypeError, ValueError):  # Some builtins have no signature.
    return False
  return any(p.name == "name" or p.kind is p.VAR_KEYWORD for p in params)


def draws_anew(layer: keras.layers.Layer) -> bool:
  """Whether ``layer`` draws a new output on every call (it sets
  ``random_output``, e.g. `Noise`): backprop must not run it again."""
  return bool(getattr(layer, "random_output", False))


def has_random_output(op_name: str) -> bool:
  """`draws_anew` for the registered op ``op_name``."""
  return draws_anew(get_op(op_name, 1, 1, affine=False))


def get_op(op_name: str, channels: int, stride: int, affine: bool = True,
           name: str | None = None) -> keras.layers.Layer:
  """Builds the registered op ``op_name``.

  Args:
    op_name: A key of `OPS`.
    channels: Input and output channel count.
    stride: 1, or 2 for a reduction edge.
    affine: Whether the op's BatchNorms learn scale and shift.
    name: Optional layer name.

  Returns:
    An unbuilt Keras layer.

  Raises:
    UnknownOpError: (a KeyError and ValueError) if ``op_name`` is unknown; the
      message lists the registered ops.
  """
  if op_name not in OPS:
    raise UnknownOpError(f"unknown op {op_name!r}; known ops: "
                         f"{', '.join(sorted(OPS))}")
  factory = OPS[op_name]
  if name is None:
    return factory(channels, stride, affine)
  if _accepts_name(factory):
    return factory(channels, stride, affine, name=name)
  layer = factory(channels, stride, affine)
  # Variable paths are fixed at build time, so renaming an unbuilt layer is
  # safe; this keeps plain 3-argument factories usable.
  layer.name = name
  return layer


def _check_stride(stride):
  if stride not in (1, 2):
    raise ValueError(f"stride must be 1 or 2, got {stride}")


def _check_odd(kernel_size):
  # Symmetric 'same'-size padding needs an odd (effective) kernel.
  if kernel_size % 2 != 1:
    raise ValueError(f"kernel_size must be odd, got {kernel_size}")


def _subsample(x, stride, offset=0):
  """``x[:, offset::stride, offset::stride, :]`` with ``ceil(size / stride)``
  rows and columns, reading zeros past the end (``offset < stride``).

  With static H, W and C this is a pad, a reshape and an unstrided slice:
  TF's strided slice, and even more its gradient, is 5-8x slower on a CPU
  (measured on [64, 32, 32, 16]), and single-path steps are dominated by
  such ops. The batch dimension may be unknown.
  """
  if stride == 1 and offset == 0:
    return x
  _, h, w, c = x.shape
  if h is None or w is None or c is None:
    shape = tf.shape(x)
    rows, cols = (shape[1] + stride - 1) // stride, (
        shape[2] + stride - 1) // stride
    x = tf.pad(x, [[0, 0], [0, stride], [0, stride], [0, 0]])
    return x[:, offset::stride, offset::stride, :][:, :rows, :cols, :]
  rows, cols = -(-h // stride), -(-w // stride)
  x = tf.pad(x, [[0, 0], [0, rows * stride - h], [0, cols * stride - w],
                 [0, 0]])
  # [B * rows, stride, cols, stride * C]: entry (r, i, q, j * C + k) is
  # pixel (r * stride + i, q * stride + j), channel k.
  y = tf.reshape(x, [-1, stride, cols, stride * c])
  y = tf.slice(y, [0, offset, 0, offset * c], [-1, 1, cols, c])
  return tf.reshape(y, [-1, rows, cols, c])


def _pad(x, pad):
  return tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])


@keras.saving.register_keras_serializable(package="tfnas")
class Zero(keras.layers.Layer):
  """The ``none`` op: zeros shaped like the (strided) input.

  Multiplies by zero rather than creating zeros so that the output stays
  connected to the input in the graph (zero gradients instead of None).

  Args:
    stride: Spatial stride.
    **kwargs: Forwarded to ``keras.layers.Layer``.
  """

  # Its output and every gradient through it are zeros (`switch_path`'s
  # backward skips recomputing it and returns zeros even where dy is not
  # finite, which would make ``dy * 0`` NaN).
  output_is_zero = True

  def __init__(self, stride: int = 1, **kwargs):
    super().__init__(**kwargs)
    self.stride = stride

  def build(self, input_shape):
    self.built = True

  def call(self, inputs, training=None):
    return _subsample(inputs, self.stride) * 0.0

  def get_config(self):
    config = super().get_config()
    config.update(stride=self.stride)
    return config


@keras.saving.register_keras_serializable(package="tfnas")
class Identity(keras.layers.Layer):
  """The stride-1 ``skip_connect`` op."""

  def build(self, input_shape):
    self.built = True

  def call(self, inputs, training=None):
    return inputs


@keras.saving.register_keras_serializable(package="tfnas")
class Pool(keras.layers.Layer):
  """Max or average pooling with PyTorch padding semantics.

  Padding is ``pool_size // 2`` on every side; average pooling ignores padded
  positions (PyTorch ``count_include_pad=False``), which is what TF's 'SAME'
  pooling does. Stride 2 is stride-1 'SAME' pooling subsampled, reproducing
  the symmetric padding exactly.

  Args:
    pool_type: ``"max"`` or ``"avg"``.
    pool_size: Odd window size.
    stride: Spatial stride.
    **kwargs: Forwarded to ``keras.layers.Layer``.
  """

  def __init__(self, pool_type: str, pool_size: int = 3, stride: int = 1,
               **kwargs):
    super().__init__(**kwargs)
    if pool_type not in ("max", "avg"):
      raise ValueError(f"pool_type must be 'max' or 'avg', got {pool_type!r}")
    _check_odd(pool_size)
    self.pool_type = pool_type
    self.pool_size = pool_size
    self.stride = stride

  def build(self, input_shape):
    self.built = True

  def call(self, inputs, training=None):
    pool = tf.nn.max_pool2d if self.pool_type == "max" else tf.nn.avg_pool2d
    return _subsample(pool(inputs, self.pool_size, 1, "SAME"), self.stride)

  def get_config(self):
    config = super().get_config()
    config.update(pool_type=self.pool_type, pool_size=self.pool_size,
                  stride=self.stride)
    return config


@keras.saving.register_keras_serializable(package="tfnas")
class ReLUConvBN(keras.layers.Layer):
  """ReLU → k×k conv (symmetric padding ``k // 2``) → BatchNorm.

  Args:
    c_in: Input channels.
    c_out: Output channels.
    kernel_size: Odd kernel size.
    stride: Spatial stride.
    affine: Whether the BatchNorm learns scale and shift.
    **kwargs: Forwarded to ``keras.layers.Layer``.
  """

  def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int,
               affine: bool = True, **kwargs):
    super().__init__(**kwargs)
    _check_odd(kernel_size)
    self.c_in = c_in
    self.c_out = c_out
    self.kernel_size = kernel_size
    self.stride = stride
    self.affine = affine
    # Stride 1 'same' is symmetric for odd k; stride > 1 pads explicitly.
    self.conv = keras.layers.Conv2D(
        c_out, kernel_size, strides=stride,
        padding="same" if stride == 1 else "valid", use_bias=False,
        kernel_initializer=conv_kernel(), dtype=self.dtype_policy,
        name="conv")
    self.bn = BatchNorm(affine=affine, dtype=self.dtype_policy, name="bn")

  def build(self, input_shape):
    self.built = True

  def call(self, inputs, training=None):
    x = tf.nn.relu(inputs)
    if self.stride != 1:
      x = _pad(x, self.kernel_size // 2)
    return self.bn(self.conv(x), training=training)

  def get_config(self):
    config = super().get_config()
    config.update(c_in=self.c_in, c_out=self.c_out,
                  kernel_size=self.kernel_size, stride=self.stride,
                  affine=self.affine)
    return config


@keras.saving.register_keras_serializable(package="tfnas")
class SepConv(keras.layers.Layer):
  """DARTS separable conv: two stacked ReLU → depthwise → pointwise → BN.

  Only the first depthwise conv is strided; the first pointwise conv keeps
  ``c_in`` channels and the second maps to ``c_out``.

  Args:
    c_in: Input channels.
    c_out: Output channels.
    kernel_size: Odd kernel size.
    stride: Spatial stride of the first depthwise conv.
    affine: Whether the BatchNorms learn scale and shift.
    **kwargs: Forwarded to ``keras.layers.Layer``.
  """

  def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int,
               affine: bool = True, **kwargs):
    super().__init__(**kwargs)
    _check_odd(kernel_size)
    self.c_in = c_in
    self.c_out = c_out
    self.kernel_size = kernel_size
    self.stride = stride
    self.affine = affine
    dtype = self.dtype_policy
    self.dw1 = keras.layers.DepthwiseConv2D(
        kernel_size, strides=stride,
        padding="same" if stride == 1 else "valid", use_bias=False,
        depthwise_initializer=conv_kernel(depthwise=True), dtype=dtype,
        name="dw1")
    self.pw1 = keras.layers.Conv2D(c_in, 1, use_bias=False,
                                   kernel_initializer=conv_kernel(),
                                   dtype=dtype, name="pw1")
    self.bn1 = BatchNorm(affine=affine, dtype=dtype, name="bn1")
    self.dw2 = keras.layers.DepthwiseConv2D(
        kernel_size, padding="same", use_bias=False,
        depthwise_initializer=conv_kernel(depthwise=True), dtype=dtype,
        name="dw2")
    self.pw2 = keras.layers.Conv2D(c_out, 1, use_bias=False,
                                   kernel_initializer=conv_kernel(),
                                   dtype=dtype, name="pw2")
    self.bn2 = BatchNorm(affine=affine, dtype=dtype, name="bn2")

  def build(self, input_shape):
    self.built = True

  def call(self, inputs, training=None):
    x = tf.nn.relu(inputs)
    if self.stride != 1:
      x = _pad(x, self.kernel_size // 2)
    x = self.bn1(self.pw1(self.dw1(x)), training=training)
    x = tf.nn.relu(x)
    return self.bn2(self.pw2(self.dw2(x)), training=training)

  def get_config(self):
    config = super().get_config()
    config.update(c_in=self.c_in, c_out=self.c_out,
                  kernel_size=self.kernel_size, stride=self.stride,
                  affine=self.affine)
    return config


@keras.saving.register_keras_serializable(package="tfnas")
class DilConv(keras.layers.Layer):
  """ReLU → dilated depthwise conv → pointwise conv → BN.

  Padding is ``dilation * (kernel_size - 1) // 2`` on every side. TF cannot
  combine stride > 1 with dilation > 1 in a depthwise conv: with stride ==
  dilation (the reduction edges) the input is subsampled and convolved
  undilated, which reads exactly the same pixels; otherwise the depthwise
  conv runs at stride 1 ('same', symmetric for odd kernels) and is then
  subsampled. Both equal the strided conv.

  Args:
    c_in: Input channels.
    c_out: Output channels.
    kernel_size: Odd kernel size.
    stride: Spatial stride.
    dilation: Dilation rate of the depthwise conv.
    affine: Whether the BatchNorm learns scale and shift.
    **kwargs: Forwarded to ``keras.layers.Layer``.
  """

  def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int,
               dilation: int = 2, affine: bool = True, **kwargs):
    super().__init__(**kwargs)
    _check_odd(kernel_size)
    self.c_in = c_in
    self.c_out = c_out
    self.kernel_size = kernel_size
    self.stride = stride
    self.dilation = dilation
    self.affine = affine
    self.dw = keras.layers.DepthwiseConv2D(
        kernel_size, padding="same", dilation_rate=dilation, use_bias=False,
        depthwise_initializer=conv_kernel(depthwise=True),
        dtype=self.dtype_policy, name="dw")
    self.pw = keras.layers.Conv2D(c_out, 1, use_bias=False,
                                  kernel_initializer=conv_kernel(),
                                  dtype=self.dtype_policy, name="pw")
    self.bn = BatchNorm(affine=affine, dtype=self.dtype_policy, name="bn")

  def build(self, input_shape):
    self.built = True

  def call(self, inputs, training=None):
    if self.stride > 1 and self.stride == self.dilation:
      # A k×k conv dilated by d at stride d reads only every d-th pixel:
      # it is the undilated k×k conv ('same') of the subsampled input.
      # Same kernel, a quarter of the work, no space-to-batch reshuffles.
      x = tf.nn.relu(_subsample(inputs, self.stride))
      if not self.dw.built:
        self.dw.build(x.shape)
      kernel = tf.cast(self.dw.kernel, x.dtype)
      x = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "SAME")
    else:
      x = _subsample(self.dw(tf.nn.relu(inputs)), self.stride)
    return self.bn(self.pw(x), training=training)

  def get_config(self):
    config = super().get_config()
    config.update(c_in=self.c_in, c_out=self.c_out,
                  kernel_size=self.kernel_size, stride=self.stride,
                  dilation=self.dilation, affine=self.affine)
    return config


@keras.saving.register_keras_serializable(package="tfnas")
class FactorizedReduce(keras.layers.Layer):
  """Halves H and W: ReLU → two offset 1×1 stride-2 convs → concat → BN.

  The second conv sees the input shifted by one pixel, ``x[:, 1:, 1:, :]``,
  zero-padded at the bottom/right so both branches give ``ceil(H/2)`` rows
  also for odd sizes (where the PyTorch reference would fail).

  Args:
    c_in: Input channels.
    c_out: Output channels; must be even (each branch gives half).
    affine: Whether the BatchNorm learns scale and shift.
    **kwargs: Forwarded to ``keras.layers.Layer``.
  """

  def __init__(self, c_in: int, c_out: int, affine: bool = True, **kwargs):
    super().__init__(**kwargs)
    if c_out % 2:
      raise ValueError(f"FactorizedReduce needs an even c_out, got {c_out}")
    self.c_in = c_in
    self.c_out = c_out
    self.affine = affine
    dtype = self.dtype_policy
    # 1×1 convs of the subsampled input (= stride-2 1×1 convs).
    self.conv1 = keras.layers.Conv2D(c_out // 2, 1, use_bias=False,
                                     kernel_initializer=conv_kernel(),
                                     dtype=dtype, name="conv1")
    self.conv2 = keras.layers.Conv2D(c_out // 2, 1, use_bias=False,
                                     kernel_initializer=conv_kernel(),
                                     dtype=dtype, name="conv2")
    self.bn = BatchNorm(affine=affine, dtype=dtype, name="bn")

  def build(self, input_shape):
    self.built = True

  def call(self, inputs, training=None):
    x = tf.nn.relu(inputs)
    # Pixels (2i, 2j) and (2i+1, 2j+1); the latter read zeros past the end
    # for odd sizes.
    x = tf.concat([self.conv1(_subsample(x, 2)),
                   self.conv2(_subsample(x, 2, offset=1))], axis=-1)
    return self.bn(x, training=training)

  def get_config(self):
    config = super().get_config()
    config.update(c_in=self.c_in, c_out=self.c_out, affine=self.affine)
    return config


@keras.saving.register_keras_serializable(package="tfnas")
class Noise(keras.layers.Layer):
  """RobustDARTS S4 ``noise`` op: Gaussian noise shaped like the strided input.

  The output does not depend on the input values (and passes no gradient to
  it); every execution draws a sample, in training and inference alike.

  Every layer draws its own noise. Calls of layers of one structure may run
  one traced function (`tfnas.layers.shared_function`), where a plain
  stateful random op would give every layer the same op seeds, hence the
  same sample in a seeded run. So each call takes a base seed from a
  stateful op (new values on each execution of that op) and folds in the
  layer's own ``edge_seed``: a non-trainable int64 weight, passed into
  shared functions like any variable, set at build from a hash of the
  layer's path (distinct per layer of a network, the same for the same path
  in a new process) and left out of checkpoints
  (`tfnas.train.checkpointing.ModelVariables` keys its entries by variable
  position; older checkpoints lack it) and export fingerprints.

  Not independent under a global seed (every search sets one): separately
  traced call sites of one layer hold base-seed ops with equal op seeds, so
  their n-th executions draw the same sample (e.g. the α and weight phases
  of one DARTS step, traced as two functions); and calls through shared
  functions draw the same sample on every replica of a tf.distribute
  strategy. Different layers never share a sample.

  Args:
    stride: Spatial stride.
    mean: Mean of the noise.
    stddev: Standard deviation of the noise.
    **kwargs: Forwarded to ``keras.layers.Layer``.
  """

  def __init__(self, stride: int = 1, mean: float = 0.0, stddev: float = 1.0,
               **kwargs):
    super().__init__(**kwargs)
    self.stride = stride
    self.mean = mean
    self.stddev = stddev

  def build(self, input_shape):
    self.edge_seed = self.add_weight(
        shape=(), dtype="int64", trainable=False, name="edge_seed",
        initializer=lambda shape, dtype=None: tf.constant(
            _path_seed(self.path), tf.int64))
    self.edge_seed.derived = True  # Not state: rebuilt, never saved.
    self.built = True

  # Drawn anew on every call: a backward pass may not recompute it
  # (`switch_path` keeps it instead).
  random_output = True

  def _trackable_children(self, save_type="checkpoint", **kwargs):
    # Object-graph checkpoints (retraining) leave the derived seed out too;
    # a SavedModel keeps it (its functions read it).
    children = super()._trackable_children(save_type, **kwargs)
    if save_type == "checkpoint":
      children.pop("edge_seed", None)
    return children

  def call(self, inputs, training=None):
    shape = tf.shape(_subsample(inputs, self.stride))
    base = tf.random.uniform([2], 0, _SEED_RANGE, dtype=tf.int64)
    seed = tf.random.experimental.stateless_fold_in(
        base, tf.convert_to_tensor(self.edge_seed.value))
    return tf.random.stateless_normal(shape, seed, self.mean, self.stddev,
                                      dtype=inputs.dtype)

  def get_config(self):
    config = super().get_config()
    config.update(stride=self.stride, mean=self.mean, stddev=self.stddev)
    return config


_SEED_RANGE = 2**62


def _path_seed(path: str) -> int:
  """A non-negative int64 from ``path`` (a layer's path in its network)."""
  digest = hashlib.sha256(path.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "little") % _SEED_RANGE


def is_derived(variable) -> bool:
  """Whether ``variable`` is set from the network's structure alone (a
  `Noise` layer's ``edge_seed``), not state a checkpoint must keep."""
  return bool(getattr(variable, "derived", False))


def _register_builtin_ops():
  """Registers the built-in candidate ops (factories forward ``**kwargs``)."""

  def conv_factory(cls, kernel_size, **extra):
    def factory(channels, stride, affine, **kwargs):
      _check_stride(stride)
      return cls(channels, channels, kernel_size, stride, affine=affine,
                 **extra, **kwargs)
    return factory

  def pool_factory(pool_type):
    def factory(channels, stride, affine, **kwargs):
      del channels, affine  # Pools have no channels or BN of their own.
      _check_stride(stride)
      return Pool(pool_type, 3, stride, **kwargs)
    return factory

  def none(channels, stride, affine, **kwargs):
    del channels, affine
    _check_stride(stride)
    return Zero(stride, **kwargs)

  def skip_connect(channels, stride, affine, **kwargs):
    _check_stride(stride)
    if stride == 1:
      return Identity(**kwargs)
    return FactorizedReduce(channels, channels, affine=affine, **kwargs)

  def noise(channels, stride, affine, **kwargs):
    del channels, affine
    _check_stride(stride)
    return Noise(stride, **kwargs)

  register_op("none", none)
  register_op("max_pool_3x3", pool_factory("max"))
  register_op("avg_pool_3x3", pool_factory("avg"))
  register_op("skip_connect", skip_connect)
  for k in (3, 5, 7):
    register_op(f"sep_conv_{k}x{k}", conv_factory(SepConv, k))
  for k in (3, 5):
    register_op(f"dil_conv_{k}x{k}", conv_factory(DilConv, k, dilation=2))
  register_op("noise", noise)


_register_builtin_ops()
