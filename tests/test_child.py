"""The derived child with inherited weights: predictions, cost, BN, export."""

import dataclasses
import os

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tests import helpers
from tfnas import child as child_lib
from tfnas.errors import TfnasError
from tfnas.layers.batch_norm import BatchNorm
from tfnas.spaces import darts as darts_space
from tfnas.spaces import shufflenet

BLOCK_SPACE = shufflenet.ShuffleNetSpaceConfig.small(
    stage_channels=(8, 16, 32, 64), stem_channels=4, head_channels=16,
    num_classes=3)
BLOCK_CHILD = {"blocks": (0, 3, 1, 2, 3)}
CELL_CHILD = {"normal": (3, 0, 2, 3, 1), "reduce": (1, 3, 3, 2, 0)}


def supernet(kind):
  if kind == "blocks":
    return shufflenet.build_shufflenet_supernet(BLOCK_SPACE, (8, 8, 3))
  return darts_space.build_search_network(helpers.tiny_space(), (8, 8, 3))


def child_indices(kind):
  return BLOCK_CHILD if kind == "blocks" else CELL_CHILD


def train_a_little(net, indices):
  """A few SGD steps in training mode: weights and BN statistics move away
  from their initial values, so inheriting them is actually tested."""
  opt = tf.keras.optimizers.SGD(0.1)
  for seed in range(3):
    images, labels = helpers.batch(n=8, classes=3, seed=seed)
    with tf.GradientTape() as tape:
      logits = net(images, arch_indices=indices, training=True)
      loss = tf.reduce_mean(
          tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
    variables = [v for v in net.trainable_variables]
    grads = tape.gradient(loss, [v.value for v in variables])
    opt.apply_gradients([(g, v) for g, v in zip(grads, variables)
                         if g is not None])


class ChildTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters("blocks", "cells")
  def test_child_predicts_exactly_like_the_fixed_supernet(self, kind):
    net = supernet(kind)
    indices = child_indices(kind)
    train_a_little(net, indices)
    child = child_lib.build_child(net, indices, (8, 8, 3))
    images, _ = helpers.batch(n=6, seed=9)
    expected = net(images, arch_indices=indices, training=False)
    # Logits are small (a ShuffleNet classifier starts at N(0, 0.01), as in
    # SPOS): the comparison below is relative to their size.
    scale = float(np.abs(expected).max())
    self.assertGreater(scale, 1e-4)
    # Training moved BN statistics on the chosen path: the child must have
    # inherited those, not fresh ones.
    self.assertTrue(any(np.abs(v.numpy()).max() > 1e-6
                        for v in child.non_trainable_variables
                        if "moving_mean" in v.path))
    self.assertAllClose(child(images, training=False), expected,
                        atol=1e-4 * scale)
    # Only the chosen ops exist in the child.
    self.assertLess(len(child.variables), len(net.variables))
    if kind == "blocks":
      for b, k in enumerate(indices["blocks"]):
        self.assertEqual(child.network.blocks[b].choices,
                         (BLOCK_SPACE.choices[k],))

  def test_inheriting_from_another_supernet_is_refused(self):
    child = child_lib.build_child(supernet("blocks"), BLOCK_CHILD, (8, 8, 3))
    wider = shufflenet.build_shufflenet_supernet(
        dataclasses.replace(BLOCK_SPACE, stage_channels=(8, 16, 32, 48)),
        (8, 8, 3))
    with self.assertRaisesRegex(TfnasError, "no counterpart"):
      child_lib.inherit_weights(child, wider)  # A weight of another shape.
    renamed = shufflenet.build_shufflenet_supernet(BLOCK_SPACE, (8, 8, 3),
                                                   name="other")
    with self.assertRaisesRegex(TfnasError, "no counterpart"):
      child_lib.inherit_weights(child, renamed)  # No weight of that path.

  def test_child_cost_params_exact_and_flops_analytic(self):
    net = supernet("blocks")
    cost = child_lib.child_cost(net, BLOCK_CHILD, 8)
    table = shufflenet.block_costs(BLOCK_SPACE, 8)
    chosen = sum(table[b, k, 0] for b, k in enumerate(BLOCK_CHILD["blocks"]))
    # Stem conv 3x3x3x4 + BN(4); head 64x16 + BN(16); classifier 16x3.
    fixed = 3 * 3 * 3 * 4 + 8 + 64 * 16 + 32 + 16 * 3
    self.assertEqual(cost["params"], chosen + fixed)
    flops = (8 * 8 * 9 * 3 * 4 +
             sum(table[b, k, 1] for b, k in enumerate(BLOCK_CHILD["blocks"]))
             + 1 * 1 * 64 * 16 + 16 * 3)
    self.assertEqual(cost["flops"], flops)
    self.assertEqual(cost["madds"], flops)  # No pooling candidates.

  def test_cell_child_flops_count_the_whole_network(self):
    # helpers.tiny_space(): 8x8x3 images, C=4, 2 nodes, cells normal,
    # reduce, reduce; CELL_CHILD's ops by hand (multiply-adds per image).
    cost = child_lib.child_cost(supernet("cells"), CELL_CHILD, 8)
    stem = 8 * 8 * 27 * 12
    preprocessing = (2 * 64 * 12 * 4 +  # Cell 0: 12 -> 4, twice.
                     64 * 12 * 8 + 64 * 8 * 8 +  # Cell 1: 12, 8 -> 8.
                     2 * 16 * 8 * 8 + 16 * 16 * 16)  # Cell 2: FR; 16 -> 16.
    classifier = 32 * 3
    sep = lambda px, c: 2 * (px * 9 * c + px * c * c)  # Two dw + pw.
    convs = (2 * sep(64, 4) +  # Normal: two sep convs (and a skip).
             2 * sep(16, 8) + 16 * 8 * 8 +  # Reduce: two sep convs, FR.
             2 * sep(4, 16) + 4 * 16 * 16)
    pools = 64 * 9 * 4 + 16 * 9 * 8 + 4 * 9 * 16  # One max pool per cell.
    madds = stem + preprocessing + classifier + convs
    self.assertEqual(cost["madds"], madds)
    self.assertEqual(cost["flops"], madds + pools)

  def test_full_imagenet_space_flops_in_the_papers_range(self):
    space = shufflenet.ShuffleNetSpaceConfig()
    table = shufflenet.block_costs(space)[..., 1]
    cheapest = shufflenet.network_flops(space, table.argmin(1))
    costliest = shufflenet.network_flops(space, table.argmax(1))
    # Stem 112²·27·16, head 7²·640·1024 and classifier 1024·1000 around the
    # blocks; DSNAS's searched child (Table 3: 324M) lies in between.
    fixed = 112 * 112 * 27 * 16 + 49 * 640 * 1024 + 1024 * 1000
    self.assertEqual(cheapest, fixed + table.min(1).sum())
    self.assertLess(cheapest / 1e6, 324)
    self.assertGreater(costliest / 1e6, 324)

  def test_recalibration_averages_batch_statistics(self):
    net = supernet("blocks")
    child = child_lib.build_child(net, BLOCK_CHILD, (8, 8, 3))
    batches = [helpers.batch(n=8, seed=s)[0] for s in (1, 2)]
    used = child_lib.recalibrate_batch_norm(child, batches)
    self.assertEqual(used, 2)
    stem = child.network.stem_conv
    means = [tf.reduce_mean(stem(b), axis=[0, 1, 2]) for b in batches]
    self.assertAllClose(child.network.stem_bn.moving_mean,
                        (means[0] + means[1]) / 2, atol=1e-5)
    bns = [l for l in child._flatten_layers() if isinstance(l, BatchNorm)]
    self.assertTrue(all(bn.momentum == 0.1 for bn in bns))

  @parameterized.parameters("blocks", "cells")
  def test_saved_model_of_the_child_reloads_with_equal_outputs(self, kind):
    net = supernet(kind)
    child = child_lib.build_child(net, child_indices(kind), (8, 8, 3))
    module = tf.Module()
    module.child = child
    module.serve = tf.function(
        lambda images: {"logits": child(images, training=False)},
        input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32)])
    path = os.path.join(self.get_temp_dir(), kind)
    tf.saved_model.save(module, path, signatures={"serving_default":
                                                  module.serve})
    loaded = tf.saved_model.load(path)
    images, _ = helpers.batch(n=3, seed=4)
    out = loaded.signatures["serving_default"](images=images)["logits"]
    self.assertAllClose(out, child(images, training=False), atol=1e-5)


if __name__ == "__main__":
  tf.test.main()
