"""SNAS: relaxed sampling, eq. (6) search gradient, resource-gradient estimators."""

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tests import helpers
from tfnas import arch as arch_lib
from tfnas.arch import DecisionGroup
from tfnas.estimators.snas import SnasEstimator
from tfnas.objectives import ResourceConstraint

OPS = ("none", "skip_connect", "max_pool_3x3", "sep_conv_3x3")


def make_arch(num_decisions=1, num_ops=4, seed=0, scale=1.0, dtype=tf.float64):
  group = DecisionGroup("normal", OPS[:num_ops], num_decisions)
  return arch_lib.ArchParams([group], init_scale=scale, seed=seed, dtype=dtype)


def constant_temperature(value):
  return lambda step: tf.constant(value, tf.float32)


class TemperatureTest(tf.test.TestCase):

  def test_linear_schedule(self):
    schedule = arch_lib.linear_temperature(1.0, 0.03, total_steps=101)
    self.assertAllClose(schedule(0), 1.0)
    self.assertAllClose(schedule(50), 0.515)
    self.assertAllClose(schedule(100), 0.03)
    self.assertAllClose(schedule(500), 0.03)  # Clamped after the end.

  def test_exponential_schedule(self):
    schedule = arch_lib.exponential_temperature(1.0, 0.01, total_steps=3)
    self.assertAllClose([schedule(0), schedule(1), schedule(2)],
                        [1.0, 0.1, 0.01], rtol=1e-5)


class RelaxedSampleTest(tf.test.TestCase):

  def test_sample_is_shared_deterministic_and_on_simplex(self):
    arch = make_arch(num_decisions=5)
    dist = arch_lib.RelaxedOneHotDistribution(constant_temperature(0.5), seed=1)
    a = dist.sample(arch, step=3)["normal"]
    b = dist.sample(arch, step=3)["normal"]
    c = dist.sample(arch, step=4)["normal"]
    self.assertEqual(a.shape, (5, 4))
    self.assertAllClose(a, b)  # Same (seed, step): same Z on every replica.
    self.assertGreater(float(tf.reduce_max(tf.abs(a - c))), 1e-3)
    self.assertAllClose(tf.reduce_sum(a, -1), tf.ones(5))
    # Evaluation draws at the same step use their own noise.
    e = dist.sample(arch, step=3, salt=arch_lib.EVAL_SALT)["normal"]
    self.assertAllClose(e, dist.sample(arch, step=3,
                                       salt=arch_lib.EVAL_SALT)["normal"])
    self.assertGreater(float(tf.reduce_max(tf.abs(a - e))), 1e-3)
    per_cell = arch_lib.RelaxedOneHotDistribution(
        constant_temperature(0.5), seed=1, per_cell=True,
        cells_per_group={"normal": 3}).sample(arch, step=3)["normal"]
    self.assertEqual(per_cell.shape, (3, 5, 4))

  def test_each_step_samples_at_its_scheduled_temperature(self):
    # The annealed λ reaches the sampler, not only the logged temperature:
    # the draw equals TFP's relaxed one-hot at λ(step) with the step's seed.
    arch = make_arch(num_decisions=3, seed=0)
    schedule = arch_lib.linear_temperature(1.0, 0.05, total_steps=11)
    dist = arch_lib.RelaxedOneHotDistribution(schedule, seed=1)
    for step in (0, 10):
      _, logs = dist.sample_with_log(arch, step=step)
      expected = tfp.distributions.ExpRelaxedOneHotCategorical(
          tf.cast(schedule(step), tf.float64),
          logits=arch.logits["normal"]).sample(
              seed=arch_lib.stateless_seed(1, step, 0))
      self.assertAllClose(logs["normal"], expected, rtol=1e-6)

  def test_the_step_draws_with_its_step_number(self):
    # A step that ignored its number would reuse one Z (and λ) throughout.
    ctx = helpers.tiny_context()
    ctx.distribution = arch_lib.RelaxedOneHotDistribution(
        arch_lib.linear_temperature(1.0, 0.05, 10), seed=0)
    drawn = ctx.distribution.sample_with_log
    seen = []

    def spy(arch, step=None, salt=0):
      seen.append(int(step))
      return drawn(arch, step, salt)
    ctx.distribution.sample_with_log = spy
    for step in (0, 9):
      SnasEstimator().gradients(ctx, helpers.batch(seed=1),
                                tf.constant(step, tf.int64))
    self.assertEqual(seen, [0, 9])

  def test_alpha_gradient_matches_eq6(self):
    """∂L/∂α_k = Σ_k' (∂L/∂x_j·O_k') Z_k' (δ_k'k − Z_k) / λ (logits form).

    A single edge with a linear 'network' x_j = Σ_k Z_k o_k and
    L = c·x_j; the Gumbel noise is fixed by the stateless seed.
    """
    lam = 0.7
    arch = make_arch(num_decisions=1, seed=3)
    dist = arch_lib.RelaxedOneHotDistribution(constant_temperature(lam),
                                              seed=5)
    rng = np.random.default_rng(0)
    outputs = tf.constant(rng.standard_normal((4, 6)))  # O_k(x_i)
    c = tf.constant(rng.standard_normal(6))  # ∂L/∂x_j
    with tf.GradientTape() as tape:
      z = dist.sample(arch, step=7)["normal"][0]
      loss = tf.tensordot(c, tf.linalg.matvec(outputs, z, transpose_a=True), 1)
    grad = tape.gradient(loss, arch.logits["normal"])[0].numpy()
    z = z.numpy()
    credit = outputs.numpy() @ c.numpy()  # ∂L/∂x_j · O_k'
    expected = np.array([
        sum(credit[kp] * z[kp] * ((kp == k) - z[k]) / lam for kp in range(4))
        for k in range(4)])
    self.assertAllClose(grad, expected, atol=1e-5)


def _exact_relaxed_gradient(a, lam, cost):
  """d/dα E[Zᵀ C] for K = 2 by quadrature.

  Z_1 = σ((a + u)/λ) with a = α_1 − α_2 and u ~ Logistic(0, 1) (the
  difference of two Gumbels), so E[Z_1] = ∫ σ((a+u)/λ) f(u) du.
  """
  u = np.linspace(-60, 60, 400001)
  du = u[1] - u[0]
  f = np.exp(-u) / (1 + np.exp(-u)) ** 2
  s = 1 / (1 + np.exp(-(a + u) / lam))
  d_ez1 = np.sum(s * (1 - s) / lam * f) * du
  d = (cost[0] - cost[1]) * d_ez1
  return np.array([d, -d])


class ResourceGradientTest(tf.test.TestCase):

  def _mc_gradient(self, gradient, num_samples, lam=0.6):
    arch = make_arch(num_decisions=1, num_ops=2, seed=2)
    arch.logits["normal"].assign([[0.4, -0.3]])
    cost = np.array([1.0, 0.2])
    dist = arch_lib.RelaxedOneHotDistribution(constant_temperature(lam),
                                              seed=11, per_cell=True,
                                              cells_per_group={"normal": num_samples})
    # Each "cell" is an independent sample with the same local costs.
    table = np.broadcast_to(cost, (num_samples, 1, 2)).copy()
    resource = ResourceConstraint({"normal": table}, 1.0, gradient)
    with tf.GradientTape() as tape:
      sample, logs = dist.sample_with_log(arch, step=0)
      surrogate = resource.surrogate(arch, sample, logs, dist, 0)
    grad = tape.gradient(surrogate, arch.logits["normal"]).numpy()[0]
    exact = _exact_relaxed_gradient(0.7, lam, cost)
    return grad / num_samples, exact

  def test_policy_gradient_mean_matches_exact(self):
    mc, exact = self._mc_gradient("policy", 200000)
    # Score-function estimates are noisy: 200k samples, tolerance ~5 std.
    self.assertAllClose(mc, exact, atol=0.01)
    self.assertAllClose(mc.sum(), 0.0, atol=1e-9)  # Softmax invariance.

  def test_reparameterised_mean_matches_exact(self):
    mc, exact = self._mc_gradient("reparam", 200000)
    self.assertAllClose(mc, exact, atol=0.002)

  def test_a_shared_sample_costs_every_cell_of_its_type(self):
    # One Z for the two cells of a type: C(Z) sums both cells' costs.
    rng = np.random.default_rng(0)
    table = rng.uniform(size=(2, 3, 4))
    z = rng.dirichlet(np.ones(4), size=3)
    cost = ResourceConstraint({"normal": table}, 1.0, "reparam").cost(
        {"normal": tf.constant(z)})
    self.assertAllClose(cost, (z * table.sum(0)).sum())
    self.assertGreater(float(cost), (z * table[0]).sum() * 1.2)

  def test_exact_option_is_discrete_expectation(self):
    arch = make_arch(num_decisions=3, seed=4)
    cost = np.random.default_rng(1).uniform(size=(1, 3, 4))
    resource = ResourceConstraint({"normal": cost}, 2.0, "exact")
    with tf.GradientTape() as tape:
      value = resource.surrogate(arch, {"normal": tf.zeros((3, 4), tf.float64)},
                                 None, None, 0)
    grad = tape.gradient(value, arch.logits["normal"]).numpy()
    p = tf.nn.softmax(arch.logits["normal"]).numpy()
    expected_cost = (p * cost[0]).sum(-1, keepdims=True)
    self.assertAllClose(grad, 2.0 * p * (cost[0] - expected_cost))

  def test_policy_gradient_on_a_masked_decision(self):
    # A decision offering candidates 0 and 2 of three is the K = 2 relaxed
    # categorical over them: finite, the same mean gradient as the
    # unmasked pair, nothing for the candidate it does not offer (whose
    # logit and cost are large, so any leak would show).
    lam, n = 0.6, 200000
    group = DecisionGroup("normal", OPS[:3], 1,
                          mask=((True, False, True),))
    arch = arch_lib.ArchParams([group], init_scale=0.0, dtype=tf.float64)
    arch.logits["normal"].assign([[0.4, 5.0, -0.3]])
    dist = arch_lib.RelaxedOneHotDistribution(
        constant_temperature(lam), seed=11, per_cell=True,
        cells_per_group={"normal": n})
    table = np.broadcast_to([1.0, 9.0, 0.2], (n, 1, 3)).copy()
    resource = ResourceConstraint({"normal": table}, 1.0, "policy")
    with tf.GradientTape() as tape:
      sample, logs = dist.sample_with_log(arch, step=0)
      surrogate = resource.surrogate(arch, sample, logs, dist, 0)
    grad = tape.gradient(surrogate, arch.logits["normal"]).numpy()[0] / n
    self.assertTrue(np.isfinite(float(surrogate)))
    self.assertEqual(grad[1], 0.0)
    self.assertAllClose(grad[[0, 2]],
                        _exact_relaxed_gradient(0.7, lam, [1.0, 0.2]),
                        atol=0.01)
    # The density is TFP's over the offered pair.
    import tensorflow_probability as tfp
    pair = tfp.distributions.ExpRelaxedOneHotCategorical(
        tf.constant(lam, tf.float64), logits=[[0.4, -0.3]])
    self.assertAllClose(
        dist.log_prob(arch, "normal", logs["normal"][:5], 0),
        pair.log_prob(tf.gather(logs["normal"][:5], [0, 2], axis=-1)))

  def test_unknown_gradient_is_rejected(self):
    with self.assertRaisesRegex(ValueError, "resource_gradient"):
      ResourceConstraint({}, 1.0, "magic")


def test_a_rising_temperature_is_warned_of(caplog):
  from tfnas import methods
  from tfnas.config import SearchConfig
  from tfnas.spaces import registry
  for end, warned in ((2.0, True), (0.03, False)):
    config = SearchConfig(method="snas", space="s3", temperature_start=1.0,
                          temperature_end=end)
    space = registry.space_config(config, 10, 8)
    caplog.clear()
    methods.get_method("snas").distribution(
        methods.SearchSetup(config, space, 10, 8, channels=1))
    assert ("--temperature_end=2 is above --temperature_start=1" in
            caplog.text) == warned


if __name__ == "__main__":
  tf.test.main()
