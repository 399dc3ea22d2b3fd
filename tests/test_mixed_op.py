"""MixedOp, Cell and the DARTS supernet."""

import pytest
import tensorflow as tf

from tfnas.layers.cell import Cell, cell_edges
from tfnas.layers.mixed_op import MixedOp
from tfnas.spaces import darts as darts_space
from tests import helpers

OPS = helpers.TINY_OPS


def _graph_op_types(fn, *args):
  """Op types of the traced graph, including the functions it calls."""
  graph_def = tf.function(fn).get_concrete_function(*args).graph.as_graph_def()
  # Built MixedOps run as shared functions: their ops live in the library.
  return ([node.op for node in graph_def.node] +
          [node.op for f in graph_def.library.function for node in f.node_def])


class MixedOpTest(tf.test.TestCase):

  def test_weighted_sum_equals_hand_combination(self):
    x = tf.random.normal([2, 8, 8, 4], seed=1)
    mixed = MixedOp(4, 1, OPS)
    w = tf.constant([0.1, 0.2, 0.3, 0.4])
    out = mixed(x, weights=w, training=True)
    expected = sum(float(w[k]) * mixed.ops[name](x, training=True)
                   for k, name in enumerate(OPS))
    self.assertAllClose(out, expected, atol=1e-5)

  def test_weights_matter(self):
    x = tf.random.normal([2, 8, 8, 4], seed=2)
    mixed = MixedOp(4, 2, OPS)
    a = mixed(x, weights=tf.constant([0.0, 1.0, 0.0, 0.0]), training=True)
    b = mixed(x, weights=tf.constant([0.0, 0.0, 1.0, 0.0]), training=True)
    self.assertEqual(a.shape, (2, 4, 4, 4))
    self.assertGreater(float(tf.reduce_max(tf.abs(a - b))), 1e-3)

  def test_single_path_runs_only_the_chosen_op(self):
    x = tf.random.normal([2, 8, 8, 4], seed=3)
    mixed = MixedOp(4, 1, OPS)
    pool = OPS.index("max_pool_3x3")
    out = mixed(x, index=pool, training=True)
    # The other ops were never called: their weights were never created.
    self.assertTrue(mixed.ops["max_pool_3x3"].built)
    self.assertFalse(mixed.ops["sep_conv_3x3"].built)
    self.assertAllClose(out, mixed.ops["max_pool_3x3"](x, training=True))
    # The traced graph has the pool's work and none of the convolutions'.
    single = _graph_op_types(lambda t: mixed(t, index=pool, training=True), x)
    self.assertIn("MaxPool", single)
    self.assertNotIn("DepthwiseConv2dNative", single)
    self.assertNotIn("Conv2D", single)
    full = _graph_op_types(
        lambda t: mixed(t, weights=tf.fill([4], 0.25), training=True), x)
    self.assertIn("DepthwiseConv2dNative", full)
    self.assertLess(len(single), len(full) / 2)

  def test_single_path_gate_scales_and_gets_gradient(self):
    x = tf.random.normal([2, 8, 8, 4], seed=4)
    mixed = MixedOp(4, 1, OPS)
    k = OPS.index("sep_conv_3x3")
    gate = tf.Variable(tf.one_hot(k, 4))
    with tf.GradientTape() as tape:
      out = mixed(x, weights=gate, index=k, training=True)
      loss = tf.reduce_sum(out ** 2)
    grad = tape.gradient(loss, gate)
    # dL/dgate_k = <dL/dout, op(x)> = 2 * sum(op(x)^2) at gate 1.
    op_out = mixed.ops["sep_conv_3x3"](x, training=True)
    self.assertAllClose(grad[k], 2 * tf.reduce_sum(op_out ** 2), rtol=1e-4)
    self.assertAllEqual(grad.numpy()[[0, 1, 2]], [0.0, 0.0, 0.0])

  def test_edge_subset(self):
    mixed = MixedOp(4, 1, OPS, edge_ops=("skip_connect", "sep_conv_3x3"))
    self.assertEqual(sorted(mixed.ops), ["sep_conv_3x3", "skip_connect"])
    # Each offered op takes the weight of its column in the full list.
    x = tf.random.stateless_normal([2, 8, 8, 4], seed=[1, 2])
    skip, sep = OPS.index("skip_connect"), OPS.index("sep_conv_3x3")
    weights = tf.tensor_scatter_nd_update(tf.zeros([len(OPS)]),
                                          [[skip], [sep]], [0.3, 0.7])
    self.assertAllClose(
        mixed(x, weights=weights, training=False),
        0.3 * mixed.ops["skip_connect"](x, training=False) +
        0.7 * mixed.ops["sep_conv_3x3"](x, training=False), atol=1e-5)
    with self.assertRaisesRegex(ValueError, "not offered"):
      mixed(tf.zeros([1, 8, 8, 4]), index=OPS.index("max_pool_3x3"))
    with self.assertRaisesRegex(ValueError, "not among"):
      MixedOp(4, 1, OPS, edge_ops=("sep_conv_5x5",))


  def test_pooling_is_followed_by_batch_norm(self):
    # As in DARTS' search cell: a non-affine BN after each pooling op, so
    # its scale matches the convolutions' normalised outputs.
    mixed = MixedOp(4, 1, OPS, edge_ops=("max_pool_3x3",))
    x = 5.0 + 3.0 * tf.random.stateless_normal([8, 8, 8, 4], seed=[2, 3])
    y = mixed(x, weights=tf.one_hot(OPS.index("max_pool_3x3"), len(OPS)),
              training=True)
    mean, variance = tf.nn.moments(y, axes=[0, 1, 2])
    self.assertAllClose(mean, tf.zeros(4), atol=1e-4)
    self.assertAllClose(variance, tf.ones(4), atol=1e-2)


class CellTest(tf.test.TestCase):

  def test_edges_and_shapes(self):
    self.assertLen(cell_edges(4), 14)
    cell = Cell(2, 6, 6, 4, reduction=True, reduction_prev=False,
                candidates=OPS)
    s = tf.random.normal([2, 8, 8, 6])
    w = tf.fill([5, 4], 0.25)
    self.assertEqual(cell(s, s, weights=w, training=True).shape, (2, 4, 4, 8))
    prev_reduced = Cell(2, 6, 8, 4, reduction=False, reduction_prev=True,
                        candidates=OPS)
    out = prev_reduced(tf.zeros([2, 8, 8, 6]), tf.zeros([2, 4, 4, 8]),
                       weights=w, training=True)
    self.assertEqual(out.shape, (2, 4, 4, 8))


class SearchNetworkTest(tf.test.TestCase):

  def test_logits_shape_and_reductions(self):
    space = helpers.tiny_space(num_cells=5)
    self.assertEqual(space.reduction_layers, (1, 3))
    self.assertEqual(space.cell_types(),
                     ["normal", "reduce", "normal", "reduce", "normal"])
    net = darts_space.build_search_network(space, (8, 8, 3))
    images, _ = helpers.batch()
    w = {"normal": tf.fill([5, 4], 0.25), "reduce": tf.fill([5, 4], 0.25)}
    self.assertEqual(net(images, w, training=True).shape, (4, 3))

  def test_per_cell_weights_and_single_path(self):
    space = helpers.tiny_space()
    net = darts_space.build_search_network(space, (8, 8, 3))
    images, _ = helpers.batch()
    shared = {"normal": tf.fill([5, 4], 0.25), "reduce": tf.fill([5, 4], 0.25)}
    per_cell = {"normal": tf.fill([1, 5, 4], 0.25),
                "reduce": tf.fill([2, 5, 4], 0.25)}
    self.assertAllClose(net(images, shared, training=False),
                        net(images, per_cell, training=False))
    skip = OPS.index("skip_connect")
    indices = {"normal": (skip,) * 5, "reduce": (skip,) * 5}
    out = net(images, arch_indices=indices, training=True)
    self.assertEqual(out.shape, (4, 3))

  def test_space_validation(self):
    with self.assertRaisesRegex(ValueError, "unknown candidate op"):
      darts_space.DartsSpaceConfig(candidates=("conv_9x9",))
    with self.assertRaisesRegex(ValueError, "unknown search space"):
      darts_space.search_space("s9")
    with self.assertRaisesRegex(ValueError, "expected 5"):
      helpers.tiny_space(edge_ops={"normal": (("skip_connect",),)})

  def test_edge_ops_mask(self):
    edge_ops = {"normal": (("skip_connect", "sep_conv_3x3"),) * 5}
    space = helpers.tiny_space(edge_ops=edge_ops)
    groups = {g.name: g for g in space.decision_groups()}
    mask = groups["normal"].mask_array()
    self.assertAllEqual(mask[0], [False, False, True, True])
    self.assertIsNone(groups["reduce"].mask)
    net = darts_space.build_search_network(space, (8, 8, 3))
    self.assertEqual(sorted(net.cells[0].mixed_ops[0].ops),
                     ["sep_conv_3x3", "skip_connect"])


if __name__ == "__main__":
  tf.test.main()


def test_robust_darts_spaces_have_the_papers_candidates():
  from tfnas.spaces import darts as darts_space
  assert darts_space.search_space("s2").candidates == (
      "skip_connect", "sep_conv_3x3")
  assert darts_space.search_space("s3").candidates == (
      "none", "skip_connect", "sep_conv_3x3")
  assert darts_space.search_space("s4").candidates == (
      "sep_conv_3x3", "noise")


def test_an_empty_edge_op_list_is_refused():
  from tests import helpers
  space = helpers.tiny_space()
  with pytest.raises(ValueError, match=r"must be a non-empty subset"):
    helpers.tiny_space(edge_ops={"normal": ((),) * space.num_edges})
