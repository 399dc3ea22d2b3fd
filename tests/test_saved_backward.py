"""Backward passes from kept tensors (`tfnas.layers.saved_backward`)."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tfnas import ops
from tfnas.layers import saved_backward
from tfnas.layers.batch_norm import BatchNorm


def _pool_edge(pool_type, stride):
  """A DARTS pooling edge: the pool, then a non-affine batch norm."""
  return keras.Sequential([ops.Pool(pool_type, 3, stride),
                           BatchNorm(affine=False)])


_CASES = {
    "identity": lambda affine: ops.Identity(),
    "noise": lambda affine: ops.Noise(1),
    "max_pool": lambda affine: ops.Pool("max", 3, 1),
    "avg_pool_s2": lambda affine: ops.Pool("avg", 3, 2),
    "max_pool_edge": lambda affine: _pool_edge("max", 1),
    "max_pool_edge_s2": lambda affine: _pool_edge("max", 2),
    "avg_pool_edge_s2": lambda affine: _pool_edge("avg", 2),
    "batch_norm": lambda affine: BatchNorm(affine=affine),
    "relu_conv_bn": lambda affine: ops.ReLUConvBN(4, 6, 3, 1, affine),
    "relu_conv_bn_s2": lambda affine: ops.ReLUConvBN(4, 6, 3, 2, affine),
    "sep_conv_3x3": lambda affine: ops.SepConv(4, 4, 3, 1, affine),
    "sep_conv_5x5_s2": lambda affine: ops.SepConv(4, 6, 5, 2, affine),
    "dil_conv_3x3": lambda affine: ops.DilConv(4, 4, 3, 1, 2, affine),
    "dil_conv_5x5_s2": lambda affine: ops.DilConv(4, 4, 5, 2, 2, affine),
    "dil_conv_3x3_s2_d3": lambda affine: ops.DilConv(4, 4, 3, 2, 3, affine),
    "factorized_reduce": lambda affine: ops.FactorizedReduce(4, 6, affine),
}


def _params():
  return [(f"{name}_{'affine' if affine else 'plain'}", name, affine)
          for name in _CASES for affine in (False, True)]


def _perturb(layer, seed):
  """Non-default weights and statistics (a fresh BN is the identity-like
  gamma = 1, beta = 0; every entry should matter)."""
  rng = np.random.default_rng(seed)
  for v in layer.variables:
    value = rng.normal(size=v.shape).astype(np.float32)
    if "variance" in v.name:
      value = np.abs(value) + 0.5
    v.assign(value)


class SavedBackwardTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(*_params())
  def test_equals_the_tape_gradient(self, name, affine):
    size = 7 if name == "factorized_reduce" else 8
    x = tf.random.normal([4, size, size, 4], seed=1)
    layer = _CASES[name](affine)
    layer(x, training=True)  # Builds.
    _perturb(layer, 2)
    self.assertTrue(saved_backward.supported(layer, x))
    start = [v.numpy() for v in layer.non_trainable_variables]

    with tf.GradientTape() as tape:
      tape.watch(x)
      y_ref = layer(x, training=True)
    dy = tf.random.normal(y_ref.shape, seed=3)
    want = tape.gradient(y_ref, [x] + layer.trainable_variables,
                         output_gradients=dy,
                         unconnected_gradients=tf.UnconnectedGradients.ZERO)
    stats_ref = [v.numpy() for v in layer.non_trainable_variables]
    for v, s in zip(layer.non_trainable_variables, start):
      v.assign(s)

    values = [tf.convert_to_tensor(v) for v in layer.variables]
    with keras.StatelessScope(list(zip(layer.variables, values))) as scope:
      y, kept = saved_backward.forward(layer, x)
      stats = [scope.get_current_value(v)
               for v in layer.non_trainable_variables]
      self.assertLen(kept, saved_backward.num_kept(layer))
      dx, grads, dot = saved_backward.backward(layer, x, kept, dy,
                                               scope.get_current_value)
    if name == "noise":  # Drawn anew: compare with its own output.
      y_ref = y
      self.assertAllEqual(dx, tf.zeros_like(x))
    else:
      self.assertAllClose(y, y_ref, rtol=1e-5, atol=1e-5)
      self.assertAllClose(dx, want[0], rtol=1e-4, atol=1e-4)
    for got, ref in zip(stats, stats_ref):
      self.assertAllClose(got, ref, rtol=1e-6, atol=1e-6)
    self.assertCountEqual(grads, [id(v) for v in layer.trainable_variables])
    for v, ref in zip(layer.trainable_variables, want[1:]):
      self.assertAllClose(grads[id(v)], ref, rtol=1e-4, atol=1e-4)
    self.assertAllClose(dot, tf.reduce_sum(dy * y_ref), rtol=1e-4, atol=1e-3)

  @parameterized.named_parameters(
      ("sep_conv", lambda: ops.SepConv(4, 4, 3, 2, False)),
      ("dil_conv", lambda: ops.DilConv(4, 4, 3, 1, 2, False)),
      ("dil_conv_s2", lambda: ops.DilConv(4, 4, 3, 2, 2, False)),
      ("factorized_reduce", lambda: ops.FactorizedReduce(4, 4, False)),
      ("max_pool_edge", lambda: _pool_edge("max", 2)),
      ("avg_pool_edge", lambda: _pool_edge("avg", 1)),
      ("relu_conv_bn", lambda: ops.ReLUConvBN(4, 4, 3, 1, True)))
  def test_backward_runs_no_forward_kernel(self, make):
    """No conv, batch norm or pool forward op feeds the gradients: the kept
    tensors replace them (ops recorded on the backward's tapes feed
    nothing and are pruned when the function runs)."""
    x = tf.random.normal([4, 8, 8, 4], seed=1)
    layer = make()
    layer(x, training=True)
    y, kept = saved_backward.forward(layer, x)
    dy = tf.ones_like(y)
    variables = layer.variables

    @tf.function(autograph=False)
    def backward(x, kept, dy, values):
      with keras.StatelessScope(list(zip(variables, values))) as scope:
        dx, grads, dot = saved_backward.backward(layer, x, kept, dy,
                                                 scope.get_current_value)
      return [dx, dot] + [grads[k] for k in sorted(grads)]

    graph = backward.get_concrete_function(
        x, kept, dy, [tf.convert_to_tensor(v) for v in variables]).graph
    fan_in, todo = set(), [t.op for t in graph.outputs]
    while todo:
      op = todo.pop()
      if op.name not in fan_in:
        fan_in.add(op.name)
        todo.extend(t.op for t in op.inputs)
        todo.extend(op.control_inputs)
    forward_kinds = {"Conv2D", "DepthwiseConv2dNative", "FusedBatchNormV3",
                     "MaxPool", "AvgPool"}
    types = [graph.get_operation_by_name(n).type for n in fan_in]
    self.assertEmpty(set(types) & forward_kinds)
    self.assertIn("FusedBatchNormGradV3", types)
    # The op's first ReLU, of its input, is cheaper to run again than to
    # keep; the inner one's output is kept.
    self.assertLessEqual(types.count("Relu"), 1)

  def test_unsupported_layers_are_refused(self):
    """Those are recomputed instead (`switch_path`)."""
    x = tf.zeros([2, 8, 8, 4])
    self.assertFalse(saved_backward.supported(ops.Zero(1), x))
    self.assertFalse(saved_backward.supported(
        keras.Sequential([ops.Zero(1), BatchNorm(affine=False)]), x))
    self.assertFalse(saved_backward.supported(
        ops.Identity(), tf.zeros([2, 8, 8, 4], tf.float64)))
    self.assertTrue(saved_backward.supported(ops.Identity(), x))


if __name__ == "__main__":
  tf.test.main()
