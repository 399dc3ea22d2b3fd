"""Backward passes of the cell-space ops from tensors their forward pass kept.

A switched single-path edge (`switch_path`) runs its chosen op inside a
function call, and TF's own gradient of that call cannot reach the tensors
the op made inside it. Recomputing the op in the backward call is the
light option (``--recompute``). This module is the fast one: ``forward``
runs an op and returns, next to its output, the tensors its backward pass
needs (each conv's input, each batch norm's input and its kernel's reserve
spaces, an inner ReLU's output); ``backward`` turns them and the output's
gradient into the op's input and weight gradients without running the
op's convs, batch norms or max pools again (an average pool standing alone
runs again for the gate term below; on a pooling edge it is followed by a
batch norm and does not). (The op's first ReLU, of its input,
which the caller keeps anyway, is run again: one cheap elementwise op
instead of one more kept activation.)

* a batch norm's gradient is the fused kernel's own gradient kernel,
  called with the kept reserve spaces (TF's registered gradient calls the
  same kernel, but reads the reserve spaces off a forward op);
* a ReLU's is ``ReluGrad`` of its output (or input); a max pool's
  ``MaxPoolGrad`` of its input and kept output;
* every other piece (convs, pads, subsampling, average pooling) is
  differentiated with a tape from its kept input: those gradients read only
  the inputs, so the forward op recorded on the tape feeds nothing and is
  pruned when the function is instantiated.

``backward`` also returns ``sum(dy * y)``, the gradient of a gate multiplying
the output (DSNAS's dummy 1), without keeping ``y``: for an op ending in a
batch norm ``y = gamma * xhat + beta``, so the sum is
``sum(gamma * d_gamma + beta * d_beta)`` with the batch norm's own
``d_gamma = sum(dy * xhat)`` and ``d_beta = sum(dy)``.

Handled: `Identity`, `Pool`, `ReLUConvBN`, `SepConv`, `DilConv`,
`FactorizedReduce`, `Noise`, `BatchNorm` and ``keras.Sequential`` stacks of
them (a pooling edge is a pool followed by a batch norm), in float32
training mode with the batch norms on their fused kernel. `supported` says
whether a layer qualifies; the others are recomputed.
"""

from __future__ import annotations

from typing import Callable

import keras
import tensorflow as tf

from tfnas import ops
from tfnas.layers.batch_norm import BatchNorm

# Weight gradients by variable: id(variable) -> gradient.
Grads = dict[int, tf.Tensor]
ValueOf = Callable[[keras.Variable], tf.Tensor]


def supported(layer: keras.layers.Layer, x: tf.Tensor) -> bool:
  """Whether `forward` / `backward` handle ``layer`` on input ``x`` (in
  training mode)."""
  if isinstance(layer, keras.Sequential):
    handled = all(_handled(sub) for sub in layer.layers)
  else:
    handled = _handled(layer)
  return (handled and x.dtype == tf.float32 and x.shape.rank == 4 and
          layer.compute_dtype == "float32" and _fused_norms(layer, x))


def _handled(layer) -> bool:
  return type(layer) in _RULES


def _fused_norms(layer, x) -> bool:
  """Every batch norm inside ``layer`` takes the fused kernel (their inputs
  have the rank and dtype of ``x``)."""
  for sub in layer._flatten_layers():  # pylint: disable=protected-access
    if isinstance(sub, BatchNorm) and not sub._fuses(x):  # pylint: disable=protected-access
      return False
  return True


def forward(layer, x: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
  """``(layer(x, training=True), kept tensors)``; assigns the batch norms'
  moving statistics as the call would."""
  if isinstance(layer, keras.Sequential):
    kept = []
    for sub in layer.layers:
      y, sub_kept = forward(sub, x)
      kept.append((x, sub_kept))
      x = y
    inputs = [t for t, _ in kept[1:]]
    parts = [k for _, k in kept]
    return x, inputs + [t for p in parts for t in p]
  return _RULES[type(layer)][0](layer, x)


def backward(layer, x: tf.Tensor, kept: list[tf.Tensor], dy: tf.Tensor,
             value_of: ValueOf) -> tuple[tf.Tensor, Grads, tf.Tensor]:
  """``(dx, weight gradients, sum(dy * y))`` of ``y = layer(x)`` from the
  tensors `forward` kept (shapes as `forward` made them)."""
  if isinstance(layer, keras.Sequential):
    subs = layer.layers
    inputs = [x] + list(kept[:len(subs) - 1])
    rest = list(kept[len(subs) - 1:])
    parts = []
    for sub in subs:
      n = num_kept(sub)
      parts.append(rest[:n])
      rest = rest[n:]
    grads: Grads = {}
    dot = None
    for sub, t, part in reversed(list(zip(subs, inputs, parts))):
      dy, sub_grads, sub_dot = backward(sub, t, part, dy, value_of)
      grads.update(sub_grads)
      dot = sub_dot if dot is None else dot
    return dy, grads, dot
  return _RULES[type(layer)][1](layer, x, kept, dy, value_of)


def num_kept(layer) -> int:
  """How many tensors `forward` keeps for ``layer`` (a `supported` one)."""
  if isinstance(layer, keras.Sequential):
    return len(layer.layers) - 1 + sum(num_kept(s) for s in layer.layers)
  count = _RULES[type(layer)][2]
  return count(layer) if callable(count) else count


def _vjp(fn, x, dy, variables, value_of) -> tuple[tf.Tensor, Grads]:
  """Gradients of ``fn(x)`` for ``x`` and ``variables`` (read inside ``fn``
  through the enclosing ``StatelessScope``); ``fn``'s own ops are dead in
  the result when their gradients read only their inputs."""
  values = [value_of(v) for v in variables]
  with tf.GradientTape() as tape:
    tape.watch([x] + values)
    y = fn(x)
  out = tape.gradient(y, [x] + values, output_gradients=dy,
                      unconnected_gradients=tf.UnconnectedGradients.ZERO)
  return out[0], {id(v): g for v, g in zip(variables, out[1:])}


def _relu(x):
  return tf.nn.relu(x)


def _relu_grad(dy, y):
  """The gradient of ``y = relu(x)`` from ``y`` (TF's rule reads the
  output too)."""
  return tf.raw_ops.ReluGrad(gradients=dy, features=y)


# Batch norm (training, fused kernel).

def _norm_forward(bn: BatchNorm, x):
  y, reserve = bn.fused_training_with_reserve(x)
  return y, list(reserve)


def _norm_backward(bn: BatchNorm, x, kept, dy, value_of):
  scale = (value_of(bn.gamma) if bn.affine
           else tf.ones([x.shape[-1]], x.dtype))
  dx, d_scale, d_offset = bn.fused_training_gradient(x, scale, kept, dy)
  if not bn.affine:
    return dx, {}, tf.reduce_sum(d_scale)
  grads = {id(bn.gamma): d_scale, id(bn.beta): d_offset}
  dot = tf.reduce_sum(scale * d_scale + value_of(bn.beta) * d_offset)
  return dx, grads, dot


# The ops.

def _identity_forward(layer, x):
  return x, []


def _identity_backward(layer, x, kept, dy, value_of):
  return dy, {}, tf.reduce_sum(dy * x)


def _noise_forward(layer, x):
  y = layer(x, training=True)
  return y, [y]


def _noise_backward(layer, x, kept, dy, value_of):
  return tf.zeros_like(x), {}, tf.reduce_sum(dy * kept[0])


def _pool_forward(layer: ops.Pool, x):
  if layer.pool_type == "max":
    pooled = tf.nn.max_pool2d(x, layer.pool_size, 1, "SAME")
    return ops._subsample(pooled, layer.stride), [pooled]  # pylint: disable=protected-access
  return layer(x, training=True), []


def _pool_backward(layer: ops.Pool, x, kept, dy, value_of):
  stride = layer.stride
  if layer.pool_type == "max":
    pooled = kept[0]
    d_pooled, _ = _vjp(lambda t: ops._subsample(t, stride), pooled, dy, [],  # pylint: disable=protected-access
                       value_of)
    k = layer.pool_size
    dx = tf.raw_ops.MaxPoolGrad(orig_input=x, orig_output=pooled,
                                grad=d_pooled, ksize=[1, k, k, 1],
                                strides=[1, 1, 1, 1], padding="SAME")
    y = ops._subsample(pooled, stride)  # pylint: disable=protected-access
    return dx, {}, tf.reduce_sum(dy * y)
  dx, _ = _vjp(lambda t: layer(t, training=True), x, dy, [], value_of)
  return dx, {}, tf.reduce_sum(dy * layer(x, training=True))


def _relu_front_norm_forward(front, bn: BatchNorm, x):
  """``bn(front(relu(x)))`` keeping the norm's input and reserve spaces
  (``relu(x)`` is cheap to run again from the input the caller holds)."""
  c = front(_relu(x))
  y, reserve = _norm_forward(bn, c)
  return y, [c] + reserve


def _relu_front_norm_backward(front, front_variables, bn: BatchNorm, x, kept,
                              dy, value_of):
  """Backward of `_relu_front_norm_forward`."""
  c, *reserve = kept
  dc, grads, dot = _norm_backward(bn, c, reserve, dy, value_of)
  dq, g = _vjp(front, _relu(x), dc, front_variables, value_of)
  grads.update(g)
  return _relu_grad(dq, x), grads, dot


def _conv_front(layer: ops.ReLUConvBN):
  return lambda q: layer.conv(_maybe_pad(q, layer.stride, layer.kernel_size))


def _relu_conv_bn_forward(layer: ops.ReLUConvBN, x):
  return _relu_front_norm_forward(_conv_front(layer), layer.bn, x)


def _relu_conv_bn_backward(layer: ops.ReLUConvBN, x, kept, dy, value_of):
  return _relu_front_norm_backward(_conv_front(layer), [layer.conv.kernel],
                                   layer.bn, x, kept, dy, value_of)


def _maybe_pad(x, stride, kernel_size):
  return x if stride == 1 else ops._pad(x, kernel_size // 2)  # pylint: disable=protected-access


def _sep_conv_forward(layer: ops.SepConv, x):
  q0 = _relu(x)
  a1 = layer.dw1(_maybe_pad(q0, layer.stride, layer.kernel_size))
  b1 = layer.pw1(a1)
  y1, reserve1 = _norm_forward(layer.bn1, b1)
  q1 = _relu(y1)
  a2 = layer.dw2(q1)
  b2 = layer.pw2(a2)
  y, reserve2 = _norm_forward(layer.bn2, b2)
  return y, [a1, b1, q1, a2, b2] + reserve1 + reserve2


def _sep_conv_backward(layer: ops.SepConv, x, kept, dy, value_of):
  a1, b1, q1, a2, b2 = kept[:5]
  reserve1, reserve2 = kept[5:8], kept[8:11]
  q0 = _relu(x)
  db2, grads, dot = _norm_backward(layer.bn2, b2, reserve2, dy, value_of)
  da2, g = _vjp(layer.pw2, a2, db2, [layer.pw2.kernel], value_of)
  grads.update(g)
  dq1, g = _vjp(layer.dw2, q1, da2, [layer.dw2.kernel], value_of)
  grads.update(g)
  db1, g, _ = _norm_backward(layer.bn1, b1, reserve1, _relu_grad(dq1, q1),
                             value_of)
  grads.update(g)
  da1, g = _vjp(layer.pw1, a1, db1, [layer.pw1.kernel], value_of)
  grads.update(g)
  dq0, g = _vjp(
      lambda t: layer.dw1(_maybe_pad(t, layer.stride, layer.kernel_size)),
      q0, da1, [layer.dw1.kernel], value_of)
  grads.update(g)
  return _relu_grad(dq0, x), grads, dot


def _dil_conv_front(layer: ops.DilConv):
  """The depthwise part of `DilConv.call` after its ReLU, and whether the
  ReLU reads the subsampled input (see `DilConv.call`)."""
  if layer.stride > 1 and layer.stride == layer.dilation:
    def front(q):
      kernel = tf.cast(layer.dw.kernel, q.dtype)
      return tf.nn.depthwise_conv2d(q, kernel, [1, 1, 1, 1], "SAME")
    return front, True
  return (lambda q: ops._subsample(layer.dw(q), layer.stride)), False  # pylint: disable=protected-access


def _dil_conv_forward(layer: ops.DilConv, x):
  front, subsampled = _dil_conv_front(layer)
  if not layer.dw.built:
    layer.dw.build(x.shape)
  q = _relu(ops._subsample(x, layer.stride) if subsampled else x)  # pylint: disable=protected-access
  a = front(q)
  b = layer.pw(a)
  y, reserve = _norm_forward(layer.bn, b)
  return y, [a, b] + reserve


def _dil_conv_backward(layer: ops.DilConv, x, kept, dy, value_of):
  a, b, *reserve = kept
  front, subsampled = _dil_conv_front(layer)
  q = _relu(ops._subsample(x, layer.stride) if subsampled else x)  # pylint: disable=protected-access
  db, grads, dot = _norm_backward(layer.bn, b, reserve, dy, value_of)
  da, g = _vjp(layer.pw, a, db, [layer.pw.kernel], value_of)
  grads.update(g)
  dq, g = _vjp(front, q, da, [layer.dw.kernel], value_of)
  grads.update(g)
  dx = _relu_grad(dq, q)
  if subsampled:
    dx, _ = _vjp(lambda t: ops._subsample(t, layer.stride), x, dx, [],  # pylint: disable=protected-access
                 value_of)
  return dx, grads, dot


def _reduce_front(layer: ops.FactorizedReduce):
  def front(q):
    return tf.concat([layer.conv1(ops._subsample(q, 2)),  # pylint: disable=protected-access
                      layer.conv2(ops._subsample(q, 2, offset=1))], axis=-1)  # pylint: disable=protected-access
  return front


def _reduce_forward(layer: ops.FactorizedReduce, x):
  return _relu_front_norm_forward(_reduce_front(layer), layer.bn, x)


def _reduce_backward(layer: ops.FactorizedReduce, x, kept, dy, value_of):
  return _relu_front_norm_backward(
      _reduce_front(layer), [layer.conv1.kernel, layer.conv2.kernel],
      layer.bn, x, kept, dy, value_of)


# type -> (forward, backward, number of kept tensors or a function of the
# layer giving it)
_RULES = {
    ops.Identity: (_identity_forward, _identity_backward, 0),
    ops.Noise: (_noise_forward, _noise_backward, 1),
    ops.Pool: (_pool_forward, _pool_backward,
               lambda layer: int(layer.pool_type == "max")),
    ops.ReLUConvBN: (_relu_conv_bn_forward, _relu_conv_bn_backward, 4),
    ops.SepConv: (_sep_conv_forward, _sep_conv_backward, 11),
    ops.DilConv: (_dil_conv_forward, _dil_conv_backward, 5),
    ops.FactorizedReduce: (_reduce_forward, _reduce_backward, 4),
    BatchNorm: (_norm_forward, _norm_backward, 3),
}
