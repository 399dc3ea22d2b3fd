"""Tests for tfnas.ops and tfnas.layers.batch_norm."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tfnas import ops
from tfnas.layers.batch_norm import BatchNorm
from tests.helpers import floatx

EPS = 1e-5
ALL_OPS = tuple(sorted(ops.OPS))
CONV_OPS = ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")


def rand(*shape, seed=0, dtype=np.float32):
  return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def n_trainable(layer):
  return sum(int(np.prod(w.shape)) for w in layer.trainable_weights)


def bn_at_init(x):
  # Inference-mode BN with moving stats 0/1 and gamma 1, beta 0.
  return x / np.sqrt(1.0 + EPS)


def dilated_stride_2_reference(op, x):
  """Independent reference of a stride-2, dilation-2 DilConv at init: an
  explicitly dilated kernel, symmetric padding, a strided 'VALID' conv."""
  k = op.kernel_size
  dilated = np.zeros((2 * k - 1, 2 * k - 1, x.shape[-1], 1), np.float32)
  dilated[::2, ::2] = op.dw.kernel.numpy()
  r = tf.pad(tf.nn.relu(x), [[0, 0], [k - 1, k - 1], [k - 1, k - 1], [0, 0]])
  r = tf.nn.depthwise_conv2d(r, dilated, [1, 2, 2, 1], "VALID")
  return bn_at_init(np.einsum("bhwc,cd->bhwd", r, op.pw.kernel[0, 0]))


class BatchNormTest(tf.test.TestCase, parameterized.TestCase):

  def test_hessian_vector_product_matches_finite_differences(self):
    bn = BatchNorm(dtype="float64")
    x = tf.constant(rand(2, 3, 3, 4, dtype=np.float64))
    bn(x)
    bn.gamma.assign(rand(4, seed=1, dtype=np.float64))
    bn.beta.assign(rand(4, seed=2, dtype=np.float64))
    w = tf.constant(rand(2, 3, 3, 4, seed=3, dtype=np.float64))
    v = tf.constant(rand(2, 3, 3, 4, seed=4, dtype=np.float64))

    def grad(x):
      with tf.GradientTape() as tape:
        tape.watch(x)
        f = tf.reduce_sum(w * bn(x, training=True) ** 3)
      return tape.gradient(f, x)

    with tf.GradientTape() as outer:
      outer.watch(x)
      g = grad(x)
      gv = tf.reduce_sum(g * v)
    hvp = outer.gradient(gv, x).numpy()
    h = 1e-5
    fd = ((grad(x + h * v) - grad(x - h * v)) / (2 * h)).numpy()
    rel = np.linalg.norm(hvp - fd) / np.linalg.norm(fd)
    self.assertLess(rel, 1e-6)

  @parameterized.parameters((2, 8, 8, 4), (6, 4))
  def test_training_forward_matches_keras(self, *shape):
    x = rand(*shape)
    ours = BatchNorm()(x, training=True)
    ref = keras.layers.BatchNormalization(epsilon=EPS, momentum=0.9)(
        x, training=True)
    self.assertAllClose(ours, ref, atol=1e-5)

  def test_moving_stats_follow_pytorch_update(self):
    bn = BatchNorm(momentum=0.1)
    mean, var = np.zeros(4), np.ones(4)
    for seed in (0, 1):
      x = rand(2, 4, 4, 4, seed=seed) * 3.0 + 1.0
      bn(x, training=True)
      flat = x.reshape(-1, 4)
      mean = 0.9 * mean + 0.1 * flat.mean(0)
      var = 0.9 * var + 0.1 * flat.var(0, ddof=1)
      self.assertAllClose(bn.moving_mean, mean, rtol=1e-5)
      self.assertAllClose(bn.moving_variance, var, rtol=1e-5)
    x = rand(2, 4, 4, 4, seed=2)
    for training in (None, False):  # None means inference.
      self.assertAllClose(bn(x, training=training),
                          (x - mean) / np.sqrt(var + EPS), atol=1e-5)
    self.assertAllClose(bn.moving_mean, mean, rtol=1e-5)  # Not updated.

  @parameterized.parameters(True, False)
  def test_fused_kernel_equals_the_reductions_to_second_order(self, affine):
    """float32 NHWC training takes the fused kernel: its output, moving
    statistics, gradients and a Hessian-vector product equal the plain
    reductions' (the float64 layer, which never fuses)."""
    x = rand(4, 5, 5, 3) * 2.0 + 0.5
    v = rand(4, 5, 5, 3, seed=5)
    w = rand(4, 5, 5, 3, seed=6)
    results = []
    for dtype in ("float32", "float64"):
      bn = BatchNorm(affine=affine, dtype=dtype)
      xt = tf.constant(x.astype(dtype))
      bn.build(xt.shape)
      if affine:
        bn.gamma.assign(rand(3, seed=1).astype(dtype) + 1.0)
        bn.beta.assign(rand(3, seed=2).astype(dtype))
      fn = tf.function(lambda t, bn=bn: bn(t, training=True))
      ops_used = {op.type for op in
                  fn.get_concrete_function(xt).graph.get_operations()}
      self.assertEqual("FusedBatchNormV3" in ops_used, dtype == "float32")
      with tf.GradientTape() as outer:
        outer.watch(xt)
        with tf.GradientTape() as inner:
          inner.watch(xt)
          y = bn(xt, training=True)
          f = tf.reduce_sum(tf.constant(w.astype(dtype)) * y ** 3)
        grads = inner.gradient(f, [xt] + bn.trainable_weights)
        gv = tf.reduce_sum(grads[0] * tf.constant(v.astype(dtype)))
      hvp = outer.gradient(gv, xt)
      results.append([np.asarray(t, np.float64) for t in (
          y, bn.moving_mean, bn.moving_variance, hvp, *grads)])
    for fused, exact in zip(*results):
      scale = max(np.abs(exact).max(), 1.0)
      self.assertAllClose(fused / scale, exact / scale, atol=2e-5)

  def test_weights_and_float64(self):
    with floatx("float64"):
      bn = BatchNorm(affine=False)
      y = bn(rand(4, 3, dtype=np.float64), training=True)
    self.assertEqual(y.dtype, tf.float64)
    self.assertEmpty(bn.trainable_weights)
    self.assertLen(bn.non_trainable_weights, 2)
    self.assertEqual(bn.moving_mean.dtype, "float64")


class OpShapeTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.product(op=ALL_OPS, stride=(1, 2))
  def test_shape_and_dtype(self, op, stride):
    for dtype in ("float32", "float64"):
      with floatx(dtype):
        layer = ops.get_op(op, 4, stride, affine=True)
        for size in (8, 7):
          y = layer(rand(2, size, size, 4, dtype=dtype), training=True)
          out = -(-size // stride)
          self.assertEqual(tuple(y.shape), (2, out, out, 4))
          self.assertEqual(y.dtype, dtype)

  def test_darts_ops_registered(self):
    self.assertContainsSubset(ops.DARTS_OPS, ops.OPS)
    self.assertLen(ops.DARTS_OPS, 8)
    self.assertEqual(ops.DARTS_OPS[0], "none")


class ParamCountTest(tf.test.TestCase, parameterized.TestCase):

  # C = 4. Depthwise k*k*C, pointwise C*C, BN 2*C when affine.
  @parameterized.parameters(
      ("sep_conv_3x3", 1, False, 2 * (9 * 4 + 4 * 4)),
      ("sep_conv_3x3", 2, True, 2 * (9 * 4 + 4 * 4) + 2 * 2 * 4),
      ("sep_conv_5x5", 1, False, 2 * (25 * 4 + 4 * 4)),
      ("sep_conv_7x7", 2, False, 2 * (49 * 4 + 4 * 4)),
      ("dil_conv_3x3", 1, False, 9 * 4 + 16),
      ("dil_conv_3x3", 2, True, 9 * 4 + 16 + 2 * 4),
      ("dil_conv_5x5", 1, False, 25 * 4 + 16),
      ("skip_connect", 2, False, 2 * (4 * 2)),
      ("skip_connect", 2, True, 2 * (4 * 2) + 2 * 4),
      ("skip_connect", 1, True, 0),
      ("max_pool_3x3", 2, True, 0),
      ("avg_pool_3x3", 1, True, 0),
      ("none", 2, True, 0),
      ("noise", 1, True, 0),
  )
  def test_registered_op(self, op, stride, affine, expected):
    layer = ops.get_op(op, 4, stride, affine=affine)
    layer(rand(2, 8, 8, 4), training=True)
    self.assertEqual(n_trainable(layer), expected)

  def test_relu_conv_bn(self):
    layer = ops.ReLUConvBN(4, 6, 3, 2, affine=True)
    layer(rand(2, 8, 8, 4))
    self.assertEqual(n_trainable(layer), 9 * 4 * 6 + 2 * 6)
    # Moving mean/variance exist but are not trainable.
    self.assertLen(layer.non_trainable_weights, 2)

  def test_factorized_reduce_rejects_odd_c_out(self):
    with self.assertRaisesRegex(ValueError, "5"):
      ops.FactorizedReduce(4, 5)


class OpValueTest(tf.test.TestCase, parameterized.TestCase):

  def test_none_is_zero(self):
    for stride in (1, 2):
      y = ops.get_op("none", 4, stride)(rand(2, 8, 8, 4))
      self.assertAllEqual(y, np.zeros_like(y))

  def test_skip_connect_stride_1_is_identity(self):
    x = rand(2, 8, 8, 4)
    self.assertAllEqual(ops.get_op("skip_connect", 4, 1)(x), x)

  def test_avg_pool_excludes_padding(self):
    x = rand(2, 8, 8, 4)
    y = ops.get_op("avg_pool_3x3", 4, 1)(x)
    self.assertAllClose(y[:, 0, 0], x[:, :2, :2].mean(axis=(1, 2)))
    self.assertAllClose(y[:, 3, 3], x[:, 2:5, 2:5].mean(axis=(1, 2)))

  @parameterized.parameters(8, 7)
  def test_max_pool_stride_2_matches_numpy(self, size):
    x = rand(2, size, size, 4)
    padded = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)],
                    constant_values=-np.inf)
    out = -(-size // 2)
    ref = np.stack([np.stack([padded[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
                              .max(axis=(1, 2)) for j in range(out)], 1)
                    for i in range(out)], 1)
    self.assertAllEqual(ops.get_op("max_pool_3x3", 4, 2)(x), ref)

  @parameterized.parameters((8, 2, 0), (7, 2, 0), (7, 2, 1), (8, 2, 1),
                            (7, 3, 0), (9, 3, 2))
  def test_subsample_equals_strided_slicing(self, size, stride, offset):
    x = rand(2, size, size + 1, 3)
    pad = [(0, 0), (0, stride), (0, stride), (0, 0)]
    rows, cols = -(-size // stride), -(-(size + 1) // stride)
    ref = np.pad(x, pad)[:, offset::stride, offset::stride][:, :rows, :cols]
    self.assertAllEqual(ops._subsample(x, stride, offset), ref)
    # Unknown batch (SavedModel signatures), and unknown height and width.
    for spec in (tf.TensorSpec([None, size, size + 1, 3]),
                 tf.TensorSpec([None, None, None, 3])):
      fn = tf.function(lambda t: ops._subsample(t, stride, offset),
                       input_signature=[spec])
      self.assertAllEqual(fn(x), ref)
    # Its gradient scatters back to the sampled pixels only.
    with tf.GradientTape() as tape:
      t = tf.constant(x)
      tape.watch(t)
      y = ops._subsample(t, stride, offset)
    grad = tape.gradient(y, t).numpy()
    expected = np.zeros_like(np.pad(x, pad))
    expected[:, offset::stride, offset::stride][:, :rows, :cols] = 1.0
    self.assertAllEqual(grad, expected[:, :size, :size + 1])

  def test_dil_conv_stride_2_reads_a_substituted_kernel(self):
    # The stride-2 path convolves with the depthwise kernel directly: inside
    # a StatelessScope (shared functions, DARTS's unrolled weights) it must
    # read, and differentiate, the substituted value.
    x = rand(2, 7, 7, 4)
    op = ops.DilConv(4, 4, 3, 2)
    op(x)
    other = tf.constant(np.random.default_rng(5).standard_normal(
        op.dw.kernel.shape).astype(np.float32))
    with tf.GradientTape() as tape:
      tape.watch(other)
      with keras.StatelessScope([(op.dw.kernel, other)]):
        y = op(x)
      loss = tf.reduce_sum(y * rand(2, 4, 4, 4))
    self.assertIsNotNone(tape.gradient(loss, other))
    op.dw.kernel.assign(other)
    self.assertAllClose(y, op(x), atol=1e-6)

  @parameterized.parameters(8, 7)
  def test_dil_conv_stride_2_odd_sizes(self, size):
    x = rand(2, size, size, 4)
    op = ops.DilConv(4, 4, 5, 2)
    self.assertAllClose(op(x), dilated_stride_2_reference(op, x), atol=1e-5)

  def test_dil_conv_stride_2(self):
    x = rand(2, 8, 8, 4)
    s1, s2 = ops.DilConv(4, 4, 3, 1), ops.DilConv(4, 4, 3, 2)
    s1(x), s2(x)
    s2.set_weights(s1.get_weights())
    # BN in inference is per-channel affine, so it commutes with subsampling.
    y2 = s2(x).numpy()
    self.assertAllClose(y2, s1(x)[:, ::2, ::2], atol=1e-5)
    self.assertAllClose(y2, dilated_stride_2_reference(s2, x), atol=1e-5)

  @parameterized.parameters(8, 7)
  def test_sep_conv_stride_2_pads_symmetrically(self, size):
    x = rand(2, size, size, 4)
    op = ops.SepConv(4, 4, 3, 2)
    y = op(x)
    # Symmetric padding k//2 with stride 2 == stride-1 'SAME' subsampled.
    r = tf.nn.depthwise_conv2d(tf.nn.relu(x), op.dw1.kernel, [1] * 4, "SAME")
    r = bn_at_init(tf.einsum("bhwc,cd->bhwd", r[:, ::2, ::2],
                             op.pw1.kernel[0, 0]))
    r = tf.nn.depthwise_conv2d(tf.nn.relu(r), op.dw2.kernel, [1] * 4, "SAME")
    ref = bn_at_init(tf.einsum("bhwc,cd->bhwd", r, op.pw2.kernel[0, 0]))
    self.assertAllClose(y, ref, atol=1e-5)

  def test_relu_conv_bn_stride_2_pads_symmetrically(self):
    x = rand(2, 8, 8, 4)
    op = ops.ReLUConvBN(4, 6, 3, 2)
    y = op(x)
    ref = tf.nn.conv2d(tf.nn.relu(x), op.conv.kernel, 1, "SAME")[:, ::2, ::2]
    self.assertAllClose(y, bn_at_init(ref), atol=1e-5)

  @parameterized.parameters(8, 7)
  def test_factorized_reduce_matches_numpy(self, size):
    x = rand(2, size, size, 4)
    op = ops.FactorizedReduce(4, 4)
    y = op(x, training=False)
    r = np.maximum(x, 0)
    w1, w2 = op.conv1.kernel[0, 0].numpy(), op.conv2.kernel[0, 0].numpy()
    shifted = np.pad(r[:, 1:, 1:], [(0, 0), (0, 1), (0, 1), (0, 0)])
    ref = np.concatenate([r[:, ::2, ::2] @ w1, shifted[:, ::2, ::2] @ w2], -1)
    self.assertAllClose(y, bn_at_init(ref), atol=1e-5)

  def test_noise(self):
    op = ops.get_op("noise", 8, 2)
    x = tf.constant(rand(4, 64, 64, 8))
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = op(x)
    self.assertIsNone(tape.gradient(y, x))
    self.assertEqual(tuple(y.shape), (4, 32, 32, 8))
    for out in (y, op(x * 100.0 + 5.0)):  # Same law whatever the input.
      self.assertNear(float(tf.reduce_mean(out)), 0.0, 0.03)
      self.assertNear(float(tf.math.reduce_std(out)), 1.0, 0.03)
    shifted = ops.Noise(1, mean=2.0, stddev=0.5)(x)
    self.assertNear(float(tf.reduce_mean(shifted)), 2.0, 0.02)
    self.assertNear(float(tf.math.reduce_std(shifted)), 0.5, 0.02)


class RegistryTest(tf.test.TestCase):

  def test_duplicate_registration_raises(self):
    with self.assertRaisesRegex(ValueError, "sep_conv_3x3"):
      ops.register_op("sep_conv_3x3", lambda c, s, a: ops.Identity())

  def test_unknown_op_lists_known_ops(self):
    with self.assertRaises(KeyError) as ctx:
      ops.get_op("conv_9x9", 4, 1)
    self.assertIsInstance(ctx.exception, ValueError)
    msg = str(ctx.exception)
    self.assertIn("conv_9x9", msg)
    for name in ops.DARTS_OPS:
      self.assertIn(name, msg)

  def test_decorator_and_layer_name(self):
    @ops.register_op("test_plain_factory")
    def factory(channels, stride, affine):  # No name argument.
      return ops.Zero(stride)

    try:
      self.assertIs(ops.OPS["test_plain_factory"], factory)
      layer = ops.get_op("test_plain_factory", 4, 2, name="renamed")
      self.assertEqual(layer.name, "renamed")
      self.assertEqual(ops.get_op("sep_conv_3x3", 4, 1, name="e").name, "e")
    finally:
      del ops.OPS["test_plain_factory"]

  def test_bad_stride_raises(self):
    with self.assertRaisesRegex(ValueError, "stride"):
      ops.get_op("sep_conv_3x3", 4, 3)


class ConfigTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ("zero", lambda: ops.Zero(2)),
      ("identity", ops.Identity),
      ("pool", lambda: ops.Pool("avg", 3, 2)),
      ("relu_conv_bn", lambda: ops.ReLUConvBN(4, 6, 3, 2, affine=False)),
      ("sep_conv", lambda: ops.SepConv(4, 4, 5, 2)),
      ("dil_conv", lambda: ops.DilConv(4, 4, 3, 2, dilation=2)),
      ("factorized_reduce", lambda: ops.FactorizedReduce(4, 8, affine=False)),
      ("noise", lambda: ops.Noise(2, mean=0.5, stddev=2.0)),
      ("batch_norm", lambda: BatchNorm(affine=False, momentum=0.2,
                                       epsilon=1e-3)),
  )
  def test_round_trip(self, make):
    layer = make()
    config = layer.get_config()
    clone = type(layer).from_config(config)
    self.assertEqual(clone.get_config(), config)
    # Also through the registered name, as model saving does.
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(layer))
    self.assertIsInstance(restored, type(layer))
    if isinstance(layer, ops.Noise):
      return
    x = rand(2, 8, 8, 4)
    layer(x), clone(x)
    clone.set_weights(layer.get_weights())
    self.assertAllClose(clone(x), layer(x))


class GradientTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(
      *[(op, 1) for op in CONV_OPS], ("sep_conv_3x3", 2), ("skip_connect", 2))
  def test_gradient_step(self, op, stride):
    layer = ops.get_op(op, 4, stride, affine=True)
    x = rand(2, 8, 8, 4)
    target = rand(2, 8 // stride, 8 // stride, 4, seed=1)
    layer(x)
    before = [w.numpy() for w in layer.trainable_weights]
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(layer(x, training=True) * target)
    grads = tape.gradient(loss, layer.trainable_weights)
    self.assertNotEmpty(grads)
    for w, g in zip(layer.trainable_weights, grads):
      self.assertIsNotNone(g, w.path)
    keras.optimizers.SGD(0.1).apply_gradients(
        zip(grads, layer.trainable_weights))
    for b, w in zip(before, layer.trainable_weights):
      self.assertNotAllClose(b, w, msg=w.path)
    for w in layer.non_trainable_weights:
      self.assertIn("moving", w.path)


if __name__ == "__main__":
  tf.test.main()
