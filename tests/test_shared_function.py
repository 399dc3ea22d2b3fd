"""Shared traced functions per edge structure, and cell recomputation."""

from unittest import mock

import keras
from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from tfnas.layers import mixed_op
from tfnas.layers import shared_function
from tfnas.spaces import darts as darts_space
from tests import helpers


def _network(**overrides):
  space = helpers.tiny_space(**overrides)
  return space, darts_space.build_search_network(space, (8, 8, 3))


def _copy_weights(src, dst):
  for a, b in zip(src.variables, dst.variables):
    b.assign(a)


def _arch_weights(space, seed=0):
  rng = np.random.default_rng(seed)
  return {g.name: tf.constant(rng.dirichlet(np.ones(len(g.candidates)),
                                            g.num_decisions), tf.float32)
          for g in space.decision_groups()}


def _loss_and_grads(net, images, weights, indices=None, scope_values=None):
  """Loss, ∇ of (w, α) and new non-trainable values of one training pass."""
  with tf.GradientTape() as tape:
    tape.watch(list(weights.values()))
    if scope_values is None:
      logits = net(images, arch_weights=weights, arch_indices=indices,
                   training=True)
    else:
      tape.watch(scope_values)
      mapping = list(zip(net.trainable_variables, scope_values))
      with keras.StatelessScope(mapping):
        logits = net(images, arch_weights=weights, arch_indices=indices,
                   training=True)
    loss = tf.reduce_sum(logits ** 2)
  # The tf.Variables behind the Keras ones: zero-filling unconnected Keras
  # variables fails in TF 2.21 (their dtype is a string).
  sources = ([v.value for v in net.trainable_variables] if scope_values is None
             else list(scope_values)) + list(weights.values())
  grads = tape.gradient(loss, sources,
                        unconnected_gradients=tf.UnconnectedGradients.ZERO)
  return loss, grads, [tf.convert_to_tensor(v)
                       for v in net.non_trainable_variables]


class SharedFunctionTest(tf.test.TestCase):

  def test_edges_of_one_structure_share_one_function(self):
    space, net = _network()
    images, _ = helpers.batch()
    shared_function.clear()  # Earlier tests may have traced these shapes.
    edge_body = mixed_op._mixed_op_body
    before = shared_function.num_shared_functions(edge_body)
    tf.function(lambda x: net(x, _arch_weights(space), training=True))(images)
    created = shared_function.num_shared_functions(edge_body) - before
    num_edges = space.num_cells * space.num_edges
    # 3 cells x 5 edges; per cell the stride-1 edges share a structure, and
    # in the reduction cell the stride-2 ones do too.
    self.assertGreater(created, 0)
    self.assertLessEqual(created, 5)
    self.assertLess(created, num_edges)
    a, b = net.cells[0].mixed_ops[:2]
    self.assertEqual(shared_function.structure_key(a),
                     shared_function.structure_key(b))

  def test_shared_function_captures_no_variables(self):
    # The template's variables must come in as arguments, never captured:
    # a capture would make every edge compute with the template's weights.
    space, net = _network()
    images, _ = helpers.batch()
    net(images, _arch_weights(space), training=True)
    for entry in shared_function._FUNCTIONS.values():
      for concrete in entry.function._list_all_concrete_functions():
        self.assertEmpty(concrete.variables)

  def _compare(self, indices=None, gates=True, call=lambda f: f):
    images, _ = helpers.batch(seed=3)
    space, shared = _network()
    _, inline = _network(shared_functions=False)
    _copy_weights(shared, inline)
    weights = _arch_weights(space, seed=1)
    results = []
    for net in (shared, inline):
      if gates:
        run = call(lambda: _loss_and_grads(net, images, weights, indices))
      else:
        run = call(lambda: self._loss_no_weights(net, images, indices))
      results.append(run())
    (l1, g1, s1), (l2, g2, s2) = results
    self.assertAllClose(l1, l2, rtol=1e-5)
    for a, b in zip(g1, g2):
      # float32 sums in another order: tolerance relative to the tensor's scale.
      scale = max(1.0, float(np.abs(a).max()))
      self.assertAllClose(a, b, rtol=1e-4, atol=1e-5 * scale)
    for a, b in zip(s1, s2):  # BN moving statistics were updated alike.
      self.assertAllClose(a, b, rtol=1e-5, atol=1e-6)
    self.assertNotAllClose(s1[0], np.zeros_like(s1[0]))

  @staticmethod
  def _loss_no_weights(net, images, indices):
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(net(images, arch_indices=indices, training=True) ** 2)
    grads = tape.gradient(loss, [v.value for v in net.trainable_variables],
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return loss, grads, [tf.convert_to_tensor(v)
                         for v in net.non_trainable_variables]

  def test_mixed_mode_equals_inline_eager(self):
    self._compare()

  def test_mixed_mode_equals_inline_in_function(self):
    self._compare(call=tf.function)

  def test_single_path_equals_inline(self):
    indices = {"normal": (3, 1, 2, 3, 0), "reduce": (2, 3, 1, 3, 3)}
    self._compare(indices=indices, call=tf.function)
    self._compare(indices=indices, gates=False, call=tf.function)

  def test_stateless_scope_values_get_gradients(self):
    # DARTS 2nd order evaluates the network at substituted weights; the
    # gradient must reach the substituted tensors, not the variables.
    images, _ = helpers.batch(seed=4)
    space, shared = _network()
    _, inline = _network(shared_functions=False)
    _copy_weights(shared, inline)
    weights = _arch_weights(space)
    values = [tf.convert_to_tensor(v) * 1.1 for v in shared.trainable_variables]
    stats = [v.numpy() for v in shared.non_trainable_variables]
    l1, g1, s1 = _loss_and_grads(shared, images, weights, scope_values=values)
    l2, g2, _ = _loss_and_grads(inline, images, weights, scope_values=values)
    self.assertAllClose(l1, l2, rtol=1e-5)
    for a, b in zip(g1, g2):
      # float32 sums in another order: tolerance relative to the tensor's scale.
      scale = max(1.0, float(np.abs(a).max()))
      self.assertAllClose(a, b, rtol=1e-4, atol=1e-5 * scale)
    for a, b in zip(s1, stats):  # Updates stay inside the scope.
      self.assertAllEqual(a, b)

  def test_variables_tracked_once(self):
    _, shared = _network()
    _, inline = _network(shared_functions=False)
    ids = [id(v) for v in shared.trainable_variables]
    self.assertLen(set(ids), len(ids))
    self.assertEqual([v.path for v in shared.variables],
                     [v.path for v in inline.variables])


class RecomputeTest(parameterized.TestCase, tf.test.TestCase):

  @parameterized.parameters("edge", "cell")
  def test_recompute_matches_stored_activations(self, unit):
    images, _ = helpers.batch(seed=5)
    space, plain = _network()
    _, recomputed = _network(recompute=True, recompute_unit=unit)
    _copy_weights(plain, recomputed)
    weights = _arch_weights(space, seed=2)
    step = tf.function(_loss_and_grads)
    l1, g1, s1 = step(plain, images, weights)
    l2, g2, s2 = step(recomputed, images, weights)
    self.assertAllClose(l1, l2, rtol=1e-5)
    for a, b in zip(g1, g2):
      # float32 sums in another order: tolerance relative to the tensor's scale.
      scale = max(1.0, float(np.abs(a).max()))
      self.assertAllClose(a, b, rtol=1e-4, atol=1e-5 * scale)
    for a, b in zip(s1, s2):
      self.assertAllClose(a, b, rtol=1e-5, atol=1e-6)

  @parameterized.parameters("edge", "cell")
  def test_recompute_gradients_reach_substituted_values(self, unit):
    images, _ = helpers.batch(seed=6)
    space, plain = _network()
    _, recomputed = _network(recompute=True, recompute_unit=unit)
    _copy_weights(plain, recomputed)
    weights = _arch_weights(space)
    values = [tf.convert_to_tensor(v) * 0.9 for v in plain.trainable_variables]
    _, g1, _ = _loss_and_grads(plain, images, weights, scope_values=values)
    _, g2, _ = _loss_and_grads(recomputed, images, weights,
                               scope_values=values)
    for a, b in zip(g1, g2):
      self.assertAllClose(a, b, rtol=1e-4, atol=1e-5)
    self.assertGreater(max(float(tf.reduce_max(tf.abs(g))) for g in g2), 0.0)

  def test_eager_single_path_recompute_matches_stored_activations(self):
    # DSNAS steps run eagerly: there each chosen edge's call recomputes in
    # its own backward function (`call_shared(recompute=True)`).
    images, _ = helpers.batch(seed=7)
    space, plain = _network()
    _, recomputed = _network(recompute=True)
    _copy_weights(plain, recomputed)
    indices = {"normal": (3, 1, 2, 3, 0), "reduce": (2, 3, 1, 3, 3)}
    gates = {g.name: tf.one_hot(indices[g.name], len(g.candidates))
             for g in space.decision_groups()}
    l1, g1, s1 = _loss_and_grads(plain, images, gates, indices)
    with mock.patch.object(shared_function, "_recomputed_call",
                           wraps=shared_function._recomputed_call) as spy:
      l2, g2, s2 = _loss_and_grads(recomputed, images, gates, indices)
    # Every chosen op of every cell but `none` (index 0: runs inline).
    per_type = {t: sum(1 for i in indices[t] if i != 0) for t in indices}
    self.assertEqual(spy.call_count,
                     sum(per_type[t] for t in space.cell_types()))
    self.assertAllClose(l1, l2, rtol=1e-5)
    for a, b in zip(g1, g2):  # Weights, then the gates (∂L/∂gate).
      scale = max(1.0, float(np.abs(a).max()))
      self.assertAllClose(a, b, rtol=1e-4, atol=1e-5 * scale)
    self.assertGreater(float(tf.reduce_max(tf.abs(g2[-1]))), 0.0)
    for a, b in zip(s1, s2):  # BN statistics updated once, alike.
      self.assertAllClose(a, b, rtol=1e-5, atol=1e-6)

  @parameterized.parameters(("eager", True), ("traced", True),
                            ("eager", False), ("traced", False))
  def test_recomputed_edges_keep_the_noise_sample(self, mode, shared):
    # `noise` draws anew on every call: a recomputing backward must not run
    # it again, or its weight's gradient sum(dy * y) would read another
    # sample than the loss saw. Edge (none, noise, sep_conv_3x3) in mixed
    # mode (recompute.recompute, noise left out of the recomputation) and
    # with noise chosen (eager: call_shared's recompute; traced: inline).
    # Under TestCase's global seed, shared functions give the forward and
    # the recomputing noise op equal seeds, hence equal samples, so only the
    # inline cases (shared=False) fail without that handling; unseeded runs
    # differ in every case.
    from tfnas.layers.cell import Cell
    cell = Cell(1, 4, 4, 4, False, False, ("none", "noise", "sep_conv_3x3"),
                shared_functions=shared, recompute_edges=True)
    x = tf.random.normal([2, 8, 8, 4], seed=1)
    cell(x, x, tf.fill([2, 3], 1 / 3), training=True)  # Builds every op.
    edge = cell.mixed_ops[0]
    r = tf.random.normal([2, 8, 8, 4], seed=2)

    def run(w, index):
      with tf.GradientTape() as tape:
        tape.watch(w)
        y = cell._run_edge(edge, x, w, index, training=True)
        loss = tf.reduce_sum(y * r)
      return y, tape.gradient(loss, w)
    if mode == "traced":
      run = tf.function(run, autograph=False)
    noise_only = tf.constant([0.0, 1.0, 0.0])
    for index in (None, 1):
      y, grad = run(noise_only, index)
      self.assertGreater(float(tf.math.reduce_std(y)), 0.5)  # Noise.
      self.assertAllClose(grad[1], tf.reduce_sum(y * r), rtol=1e-5)
    # Both ops weighted: each weight's gradient is the sum of dy times that
    # op's own forward output.
    w = tf.constant([0.0, 0.4, 0.6])
    y, grad = run(w, None)
    sep_out = edge.ops["sep_conv_3x3"](x, training=True)
    self.assertAllClose(grad[2], tf.reduce_sum(sep_out * r), rtol=1e-4)
    noise_part = (y - 0.6 * sep_out) / 0.4
    self.assertGreater(float(tf.math.reduce_std(noise_part)), 0.5)
    self.assertAllClose(grad[1], tf.reduce_sum(noise_part * r), rtol=1e-4)

  def test_noise_edges_of_one_structure_draw_their_own_samples(self):
    # Under TestCase's global seed a shared function gives its random ops
    # the same op seeds at every call site: a stateful draw alone made
    # every `noise` edge of one structure return the same sample in a
    # traced step. Each `Noise` folds in its own `edge_seed`.
    from tfnas.layers.cell import Cell
    cell = Cell(1, 4, 4, 4, False, False, ("none", "noise", "sep_conv_3x3"))
    x = tf.random.normal([2, 8, 8, 4], seed=1)
    cell(x, x, tf.fill([2, 3], 1 / 3), training=True)  # Builds every op.
    e0, e1 = cell.mixed_ops
    self.assertEqual(shared_function.structure_key(e0),
                     shared_function.structure_key(e1))
    seeds = [int(e.ops["noise"].edge_seed.value) for e in (e0, e1)]
    self.assertNotEqual(seeds[0], seeds[1])
    w = tf.constant([0.0, 1.0, 0.0])

    def edges(index):
      return [cell._run_edge(e, x, w, index, training=True) for e in (e0, e1)]
    for name, run in (
        ("mixed", tf.function(lambda: edges(None), autograph=False)),
        ("chosen", tf.function(lambda: edges(1), autograph=False)),
        ("switched", tf.function(lambda: edges(tf.constant(1)),
                                 autograph=False)),
        ("eager", lambda: edges(1))):
      with self.subTest(name):
        first, second = run()
        for y in (first, second):
          self.assertNear(float(tf.math.reduce_std(y)), 1.0, 0.15)
        self.assertGreater(float(tf.reduce_max(tf.abs(first - second))), 0.5)
        again, _ = run()  # A new draw on every call.
        self.assertGreater(float(tf.reduce_max(tf.abs(first - again))), 0.5)

  def test_noise_seeds_stay_out_of_checkpoints(self):
    # The seeds come from the layers' paths: search checkpoints (keyed by
    # variable position) and object-graph checkpoints leave them out, so
    # checkpoints written before the seeds existed still fit.
    from tfnas import ops
    from tfnas.layers.cell import Cell
    from tfnas.train.checkpointing import ModelVariables
    cell = Cell(1, 4, 4, 4, False, False, ("none", "noise", "sep_conv_3x3"))
    x = tf.zeros([1, 8, 8, 4])
    cell(x, x, tf.fill([2, 3], 1 / 3), training=True)
    noise = [e.ops["noise"] for e in cell.mixed_ops]
    self.assertEqual([int(n.edge_seed.value) for n in noise],
                     [ops._path_seed(n.path) for n in noise])
    saved = ModelVariables(cell).values
    self.assertLen(saved, len(cell.variables) - len(noise))
    self.assertEqual([v.dtype for v in saved.values()].count(tf.int64), 0)
    prefix = tf.train.Checkpoint(network=noise[0]).save(
        self.get_temp_dir() + "/ckpt")
    self.assertNotIn("edge_seed", str(tf.train.list_variables(prefix)))

  def test_cell_recompute_refuses_random_ops(self):
    # A whole cell recomputed would run `noise` again (no split per cell).
    with self.assertRaisesRegex(ValueError, "recompute_unit='edge'"):
      helpers.tiny_space(candidates=("none", "noise", "sep_conv_3x3"),
                         recompute=True, recompute_unit="cell")
    helpers.tiny_space(candidates=("none", "noise", "sep_conv_3x3"),
                       recompute=True)  # Per edge: fine.

  def test_mixed_op_exclude_is_checked(self):
    op = mixed_op.MixedOp(4, 1, ("none", "noise", "sep_conv_3x3"))
    x = tf.zeros([1, 8, 8, 4])
    w = tf.fill([3], 1 / 3)
    with self.assertRaisesRegex(ValueError, "mixed mode"):
      op(x, weights=w, index=2, exclude=("noise",))
    for bad in (("pool",), ("noise", "sep_conv_3x3", "none")):
      with self.assertRaisesRegex(ValueError, "some, not all"):
        op(x, weights=w, exclude=bad)

if __name__ == "__main__":
  tf.test.main()
