"""DARTS estimators: the 2nd-order α gradient against an exact nested tape."""

import keras
import numpy as np
import tensorflow as tf

from tfnas.estimators.darts import DartsFirstOrder, DartsSecondOrder
from tfnas.train.step import StepContext
from tests import helpers


class DartsSecondOrderTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    helpers.float64_for(self)  # Hessian terms are compared in float64.

  def _exact_unrolled_gradient(self, ctx, train_batch, val_batch):
    """∇α L_val(w − ξ(μ·buf + ∇w L_train(w, α) + λw), α) by nested tapes."""
    wvars, avars = ctx.weight_variables, ctx.arch_variables
    opt = ctx.weight_optimizer
    xi = tf.cast(opt.current_lr(), tf.float64)
    with tf.GradientTape() as outer:
      with tf.GradientTape() as inner:
        weights = ctx.distribution.sample(ctx.arch)
        loss_t = ctx.loss(ctx.forward(train_batch[0], weights), train_batch[1])
      g = inner.gradient(loss_t, wvars)
      unrolled = [
          tf.convert_to_tensor(v) - xi * (
              gi + opt.weight_decay * tf.convert_to_tensor(v) +
              opt.momentum * tf.convert_to_tensor(opt.momentum_buffer(i)))
          for i, (v, gi) in enumerate(zip(wvars, g))]
      weights = ctx.distribution.sample(ctx.arch)
      with keras.StatelessScope(state_mapping=list(zip(wvars, unrolled))):
        loss_v = ctx.loss(ctx.forward(val_batch[0], weights), val_batch[1])
    return outer.gradient(loss_v, avars)

  def test_matches_exact_unrolled_gradient(self):
    ctx = helpers.tiny_context(dtype=tf.float64, w_lr=0.1)
    # A non-zero momentum buffer exercises the μ·buf term of w'.
    rng = np.random.default_rng(0)
    for i, buf in enumerate(ctx.weight_optimizer.slots["momentum"]):
      buf.assign(0.1 * rng.standard_normal(buf.shape))
    train = helpers.batch(seed=1, dtype=np.float64)
    val = helpers.batch(seed=2, dtype=np.float64)
    # DARTS uses r = 0.01; on a network this small the ε-perturbation then
    # crosses ReLU / max-pool kinks, so compare in the smooth regime.
    approx, _, _ = DartsSecondOrder(r=1e-5).arch_gradient(ctx, train, val)
    exact = self._exact_unrolled_gradient(ctx, train, val)
    first, _, _ = DartsFirstOrder().arch_gradient(ctx, train, val)
    for a, e, f in zip(approx, exact, first):
      scale = float(tf.reduce_max(tf.abs(e)))
      self.assertGreater(scale, 0.0)
      # Central differences are accurate to ~ε² in float64.
      self.assertAllClose(a, e, atol=1e-6 * scale, rtol=1e-5)
      # ...and the second-order term is not negligible here, so the test
      # would notice it missing.
      self.assertGreater(float(tf.reduce_max(tf.abs(f - e))), 1e-3 * scale)

  def test_step_updates_alpha_then_weights(self):
    ctx = helpers.tiny_context()
    before_a = [v.numpy() for v in ctx.arch_variables]
    before_w = [v.numpy() for v in ctx.weight_variables]
    metrics = DartsSecondOrder().step(ctx, helpers.batch(seed=1),
                                      helpers.batch(seed=2), tf.constant(0))
    self.assertEqual(set(metrics), {f"{p}/{k}" for p in ("train", "val")
                                    for k in ("loss_sum", "correct", "count")})
    self.assertTrue(any(np.any(a != v.numpy())
                        for a, v in zip(before_a, ctx.arch_variables)))
    self.assertTrue(any(np.any(w != v.numpy())
                        for w, v in zip(before_w, ctx.weight_variables)))
    self.assertEqual(int(ctx.weight_optimizer.iterations.numpy()), 1)
    self.assertEqual(int(ctx.arch_optimizer.iterations.numpy()), 1)


class DartsFirstOrderTest(tf.test.TestCase):

  def test_alpha_gradient_is_of_the_validation_loss(self):
    ctx = helpers.tiny_context()
    train, val = helpers.batch(seed=1), helpers.batch(seed=2)
    grads, _, _ = DartsFirstOrder().arch_gradient(ctx, train, val)
    with tf.GradientTape() as tape:
      weights = ctx.distribution.sample(ctx.arch)
      loss = ctx.loss(ctx.forward(val[0], weights, training=True), val[1])
    for got, expected in zip(grads, tape.gradient(loss, ctx.arch_variables)):
      self.assertGreater(float(tf.reduce_max(tf.abs(expected))), 0.0)
      self.assertAllClose(got, expected, rtol=1e-4, atol=1e-7)

  def test_the_weight_step_learns_from_the_training_batch(self):
    train, val = helpers.batch(seed=1), helpers.batch(seed=2)
    a, b = helpers.tiny_context(), helpers.tiny_context()
    for va, vb in zip(a.weight_variables + a.arch_variables,
                      b.weight_variables + b.arch_variables):
      vb.assign(va)
    est = DartsFirstOrder()
    est.step(a, train, val, tf.constant(0))
    # The same step by hand: the α step, then w on the training batch.
    est.arch_phase(b, train, val, tf.constant(0))
    est.weight_step(b, train)
    for va, vb in zip(a.weight_variables, b.weight_variables):
      self.assertAllClose(va, vb, rtol=1e-5, atol=1e-7)


class PhasesTest(tf.test.TestCase):
  """The loop's per-phase tf.functions make the same step as ``step``."""

  # How a step is cut into phases does not depend on the ops: one-node
  # cells without pooling trace in a fraction of the time.
  SPACE = helpers.replica_space()

  def _run(self, estimator, init, split):
    ctx = helpers.tiny_context(space=self.SPACE, dtype=tf.float64)
    for v, value in zip(ctx.weight_variables + ctx.arch_variables, init):
      v.assign(value)
    train = helpers.batch(seed=1, dtype=np.float64)
    val = helpers.batch(seed=2, dtype=np.float64)
    estimator.build(ctx)
    phases = estimator.phases() if split else [estimator.step]
    metrics = {}
    # Traced as the loop traces its phases (as written, no autograph).
    compiled = [tf.function(lambda t, v, s, p=p: p(ctx, t, v, s),
                            autograph=False)
                for p in phases]
    for _ in range(2):
      for fn in compiled:
        out = fn(train, val, tf.constant(0, tf.int64))
        metrics.update({k: v.numpy() for k, v in out.items()})
    return [v.numpy() for v in ctx.weight_variables + ctx.arch_variables +
            ctx.weight_optimizer.slots["momentum"]], metrics

  def _compare(self, estimator):
    with helpers.floatx("float64"):
      init = [v.numpy() for v in
              (lambda c: c.weight_variables + c.arch_variables)(
                  helpers.tiny_context(space=self.SPACE, dtype=tf.float64))]
      self.assertGreaterEqual(len(estimator.phases()), 2)
      whole, whole_metrics = self._run(estimator, init, split=False)
      split, split_metrics = self._run(estimator, init, split=True)
    self.assertGreater(max(np.abs(a - b).max()
                           for a, b in zip(whole, init)), 1e-4)
    for a, b in zip(whole, split):
      self.assertAllClose(a, b, atol=1e-12, rtol=1e-10)
    self.assertEqual(set(whole_metrics), set(split_metrics))
    for k in whole_metrics:
      self.assertAllClose(whole_metrics[k], split_metrics[k])

  def test_first_order(self):
    self._compare(DartsFirstOrder())

  def test_second_order(self):
    self._compare(DartsSecondOrder())


if __name__ == "__main__":
  tf.test.main()


def test_gradients_of_unused_keras_variables_are_zeros_in_a_graph():
  used, unused = keras.layers.Dense(2), keras.layers.Dense(3)
  x = tf.ones((1, 4))
  used(x), unused(x)
  sources = used.trainable_variables + unused.trainable_variables

  @tf.function
  def grads():
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(used(x) ** 2)
      unused(x)  # Runs, but the loss does not read it.
    return StepContext.gradients(tape, loss, sources)
  got = grads()
  assert [tuple(g.shape) for g in got] == [(4, 2), (2,), (4, 3), (3,)]
  assert np.abs(got[0].numpy()).sum() > 0
  assert not np.any(got[2].numpy()) and not np.any(got[3].numpy())
