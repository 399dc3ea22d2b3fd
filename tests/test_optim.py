"""The recipe's optimizers against hand-computed PyTorch-semantics updates."""

import numpy as np
import tensorflow as tf

from tfnas.train import optim


class OptimTest(tf.test.TestCase):

  def test_sgd_clip_then_coupled_decay_then_momentum(self):
    w = tf.Variable([3.0, 4.0])
    opt = optim.SGD(0.1, momentum=0.9, weight_decay=0.01, clip_norm=1.0)
    opt.build([w])
    g = tf.constant([6.0, 8.0])  # norm 10 → clipped to [0.6, 0.8]
    opt.apply([g], [w])
    d1 = np.array([0.6, 0.8]) + 0.01 * np.array([3.0, 4.0])
    w1 = np.array([3.0, 4.0]) - 0.1 * d1
    self.assertAllClose(w, w1)
    opt.apply([g], [w])
    d2 = np.array([0.6, 0.8]) + 0.01 * w1
    buf = 0.9 * d1 + d2
    self.assertAllClose(w, w1 - 0.1 * buf)
    self.assertEqual(int(opt.iterations.numpy()), 2)

  def test_adam_with_coupled_decay(self):
    w = tf.Variable([1.0, -2.0])
    opt = optim.Adam(0.01, beta_1=0.5, beta_2=0.999, weight_decay=0.1)
    opt.build([w])
    g = np.array([0.5, 0.25])
    x = np.array([1.0, -2.0])
    m = v = np.zeros(2)
    for t in (1, 2):
      opt.apply([tf.constant(g, tf.float32)], [w])
      d = g + 0.1 * x
      m = 0.5 * m + 0.5 * d
      v = 0.999 * v + 0.001 * d * d
      x = x - 0.01 * (m / (1 - 0.5 ** t)) / (
          np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
      self.assertAllClose(w, x, rtol=1e-5)

  def test_cosine_schedule(self):
    lr = optim.cosine_schedule(0.025, 0.001, total_epochs=10, steps_per_epoch=5)
    self.assertAllClose(lr(tf.constant(0, tf.int64)), 0.025)
    self.assertAllClose(lr(tf.constant(4, tf.int64)), 0.025)  # Per epoch.
    self.assertAllClose(lr(tf.constant(25, tf.int64)), 0.013)
    self.assertAllClose(lr(tf.constant(50, tf.int64)), 0.001)

  def test_apply_requires_build(self):
    with self.assertRaisesRegex(RuntimeError, "build"):
      optim.SGD(0.1).apply([tf.ones(2)], [tf.Variable([0.0, 0.0])])


if __name__ == "__main__":
  tf.test.main()
