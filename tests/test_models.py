"""Evaluation networks, published genotypes and network cost counting."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tfnas import cost, genotypes, models, ops
from tfnas.genotype import CellGenotype, Genotype, GenotypeError
from tfnas.layers.derived_cell import DerivedCell, drop_path

# An SNAS-style child: nodes with 2, 1, 0 and 3 inputs.
IRREGULAR = Genotype(
    CellGenotype(((("sep_conv_3x3", 0), ("skip_connect", 1)),
                  (("dil_conv_3x3", 2),),
                  (),
                  (("max_pool_3x3", 0), ("skip_connect", 3),
                   ("avg_pool_3x3", 4)))),
    CellGenotype(((("skip_connect", 0),),
                  (),
                  (("sep_conv_5x5", 1), ("dil_conv_5x5", 0)))))


def tiny(genotype=IRREGULAR, kind="cifar", size=8, cells=3, channels=4,
         classes=5, auxiliary=True):
  return models.build_network(kind, genotype, (size, size, 3), classes,
                              cells, channels, auxiliary=auxiliary)


def images(n=4, size=8, seed=0):
  rng = np.random.default_rng(seed)
  return tf.constant(rng.standard_normal((n, size, size, 3)), tf.float32)


class TestPaperCounts:

  def test_darts_v2_cifar10_parameters(self):
    # DARTS Table 1: 3.3M parameters (20 cells, C=36, auxiliary head
    # excluded from the count). Papers print two significant digits.
    net = models.build_network("cifar", genotypes.resolve("DARTS_V2"),
                               (32, 32, 3), 10, 20, 36, auxiliary=True)
    params = net.count_params_without_auxiliary()
    assert net.auxiliary_head is not None and net.auxiliary_weights()
    assert round(params / 1e6, 1) == 3.3
    # The DARTS reference code (PyTorch, its NetworkCIFAR, parameters whose
    # name lacks "auxiliary") counts exactly this for DARTS_V2; the paper's
    # 3.3M is it rounded to two digits.
    assert params == 3_349_342
    analytic = cost.network_cost(genotypes.resolve("DARTS_V2"), "cifar",
                                 (32, 32, 3), 10, 20, 36)
    assert analytic.params == params
    total = sum(int(np.prod(v.shape)) for v in net.trainable_weights)
    assert total > params  # The auxiliary head is really left out.

  def test_darts_v1_cifar10_parameters_equal_the_reference_code(self):
    # The DARTS reference code counts 3,169,414 for DARTS_V1 (C=36, 20
    # cells, auxiliary head excluded); the paper prints 3.3M for DARTS
    # (first order), about 4% more than its own released genotype has.
    analytic = cost.network_cost(genotypes.resolve("DARTS_V1"), "cifar",
                                 (32, 32, 3), 10, 20, 36)
    assert analytic.params == 3_169_414

  def test_imagenet_mobile_setting(self):
    # DARTS Table 3 (mobile setting): 4.7M parameters, < 600M multiply-adds.
    genotype = genotypes.resolve("DARTS_V2")
    net = models.build_network("imagenet", genotype, (224, 224, 3), 1000,
                               14, 48, auxiliary=True)
    analytic = cost.network_cost(genotype, "imagenet", (224, 224, 3), 1000,
                                 14, 48)
    params = net.count_params_without_auxiliary()
    assert analytic.params == params
    assert abs(params / 4.7e6 - 1) < 0.01
    assert params == 4_718_752  # The reference code's NetworkImageNet count.
    assert 400e6 < analytic.madds < 600e6
    logits = net(tf.zeros([1, 224, 224, 3]), training=False)
    assert logits.shape == (1, 1000)


def test_madds_by_hand_for_a_one_cell_network():
  # One reduction cell, C=2 (cell channels 4), 4x4 input, 3 input channels.
  g = Genotype(CellGenotype(((("skip_connect", 0),),)),
               CellGenotype(((("sep_conv_3x3", 1),),)))
  c = cost.network_cost(g, "cifar", (4, 4, 3), 2, 1, 2)
  stem = 16 * 9 * 3 * 6          # 3x3 conv 3 -> 6 channels at 4x4
  pre = 2 * 16 * 6 * 4           # two 1x1 convs 6 -> 4 at 4x4
  sep = 4 * (9 * 4 + 16) * 2     # two dw+pw units at the 2x2 output
  classifier = 4 * 2
  assert c.madds == stem + pre + sep + classifier
  net = models.build_network("cifar", g, (4, 4, 3), 2, 1, 2)
  assert c.params == net.count_params_without_auxiliary()


def test_madds_of_a_reduction_edge_from_an_intermediate_node():
  # Node 3 of the reduction cell reads node 2, already at the 2x2 output.
  normal = CellGenotype(((("skip_connect", 0),),))

  def madds(op):
    reduce = CellGenotype(((("sep_conv_3x3", 1),), ((op, 2),)), concat=(3,))
    return cost.network_cost(Genotype(normal, reduce), "cifar", (4, 4, 3),
                             2, 1, 2).madds
  # sep_conv_3x3 at C=4 on 2x2: twice (dw 3x3 + pw 4x4) per pixel.
  assert madds("sep_conv_3x3") - madds("skip_connect") == 4 * (9 * 4 + 16) * 2


def test_imagenet_first_stem_conv_runs_at_half_resolution():
  g = genotypes.resolve("DARTS_V2")
  rgb = cost.network_cost(g, "imagenet", (224, 224, 3), 1000, 14, 48)
  grey = cost.network_cost(g, "imagenet", (224, 224, 1), 1000, 14, 48)
  # Only the first 3x3 conv (to 24 channels, stride 2: 112x112) reads them.
  assert rgb.madds - grey.madds == 112 * 112 * 9 * 2 * 24
  assert rgb.params - grey.params == 9 * 2 * 24


def test_shapes_auxiliary_and_irregular_nodes():
  net = tiny()
  x = images()
  logits = net(x, training=False)
  assert logits.shape == (4, 5)
  out = net(x, training=True, drop_seed=tf.constant([1, 2], tf.int64))
  assert isinstance(out, tuple) and out[1].shape == (4, 5)
  # Normal cells concat 4 nodes, reduction cells 3 (a node with no inputs
  # is included, as zeros); reductions at cells 1 and 2 double C.
  assert [c.output_channels for c in net.cells] == [4 * 4, 3 * 8, 3 * 16]
  assert np.all(np.isfinite(logits.numpy()))
  assert cost.network_cost(IRREGULAR, "cifar", (8, 8, 3), 5, 3, 4).params == (
      net.count_params_without_auxiliary())


def test_auxiliary_head_follows_the_cell_at_two_thirds_depth():
  net = tiny(cells=6)
  net(images(), training=True, drop_seed=tf.constant([1, 2], tf.int64))
  # Cells 2 and 4 reduce: the head reads cell 4's output (DARTS), whose
  # width differs from every earlier cell's.
  widths = [c.output_channels for c in net.cells]
  assert net.auxiliary_head.conv1.kernel.shape[2] == widths[4]
  assert widths[4] not in widths[:4]


def test_input_less_node_outputs_zeros():
  cell = DerivedCell(IRREGULAR.normal, 4, 4, 4, reduction=False,
                            reduction_prev=False)
  out = cell(images(2, 8)[..., :3] @ tf.ones([3, 4]),
             images(2, 8, seed=1)[..., :3] @ tf.ones([3, 4]), training=False)
  assert out.shape == (2, 8, 8, 16)
  node4 = out[..., 8:12]  # concat order 2, 3, 4, 5: node 4 is third.
  assert np.all(node4.numpy() == 0.0)
  assert np.any(out[..., 12:].numpy() != 0.0)


def test_drop_path_depends_on_seed_and_spares_identity():
  net = tiny(auxiliary=False)
  x = images()
  seed_a = tf.constant([3, 4], tf.int64)
  seed_b = tf.constant([5, 6], tf.int64)
  net.drop_path_prob.assign(0.0)
  base_a = net(x, training=True, drop_seed=seed_a)
  base_b = net(x, training=True, drop_seed=seed_b)
  np.testing.assert_allclose(base_a, base_b, atol=1e-6)  # p = 0: no effect.
  net.drop_path_prob.assign(0.5)
  a1 = net(x, training=True, drop_seed=seed_a)
  a2 = net(x, training=True, drop_seed=seed_a)
  b = net(x, training=True, drop_seed=seed_b)
  np.testing.assert_allclose(a1, a2, atol=1e-6)  # Same seed, same masks.
  assert np.abs(a1.numpy() - b.numpy()).max() > 1e-4
  # Inference ignores drop-path, with or without a seed.
  np.testing.assert_allclose(net(x, training=False), net(x, training=False))
  np.testing.assert_allclose(net(x, training=False, drop_seed=seed_a),
                             net(x, training=False))
  # Identity edges are never dropped: a cell of skips is unchanged.
  skips = CellGenotype(((("skip_connect", 0), ("skip_connect", 1)),),
                       concat=(2,))
  cell = DerivedCell(skips, 4, 4, 4, reduction=False, reduction_prev=False)
  s = images(8, 4) @ tf.ones([3, 4])
  np.testing.assert_allclose(
      cell(s, s, drop_prob=0.9, seed=seed_a, training=True),
      cell(s, s, drop_prob=0.0, seed=seed_a, training=True), atol=1e-6)


def test_drop_path_keeps_the_expectation():
  x = tf.ones([20000, 1])
  y = drop_path(x, 0.3, tf.constant([7, 8], tf.int64)).numpy()
  np.testing.assert_allclose(np.unique(y), [0.0, 1 / 0.7], rtol=1e-6)
  assert abs(y.mean() - 1.0) < 0.03


def test_config_round_trip():
  net = tiny(auxiliary=False)
  clone = models.NetworkCIFAR.from_config(net.get_config())
  assert clone.genotype == net.genotype
  clone(images(), training=False)
  assert clone.count_params_without_auxiliary() == (
      net.count_params_without_auxiliary())


def test_imagenet_network_small_input_and_gradient():
  net = tiny(genotypes.resolve("DARTS_V1"), kind="imagenet", size=16,
             channels=8)
  x = images(2, 16)
  with tf.GradientTape() as tape:
    logits, aux = net(x, training=True, drop_seed=tf.constant([0, 1],
                                                              tf.int64))
    loss = tf.reduce_sum(logits) + 0.4 * tf.reduce_sum(aux)
  grads = tape.gradient(loss, net.trainable_variables)
  assert all(g is not None for g in grads)


class TestResolve:

  def test_names_and_alias(self):
    assert genotypes.resolve("DARTS") == genotypes.resolve("DARTS_V2")
    assert genotypes.resolve("DARTS_V1") != genotypes.resolve("DARTS_V2")
    for g in genotypes.PUBLISHED.values():
      g.validate(op_names=ops.OPS)

  def test_unknown_name(self):
    with pytest.raises(GenotypeError, match="unknown genotype 'DARTS_V9'.*"
                       "DARTS_V2"):
      genotypes.resolve("DARTS_V9")
    with pytest.raises(GenotypeError, match=r"unknown genotype 'darts_v2' "
                       r"\(names are case-sensitive: DARTS_V2\)"):
      genotypes.resolve("darts_v2")

  def test_json_file_and_run_dir(self, tmp_path):
    IRREGULAR.save(tmp_path / "genotype.json")
    assert genotypes.resolve(str(tmp_path / "genotype.json")) == IRREGULAR
    assert genotypes.resolve(str(tmp_path)) == IRREGULAR

  @pytest.mark.parametrize("mutate, fragment", [
      (lambda d: d["normal"]["nodes"][0].__setitem__(0, ["conv_9x9", 0]),
       "unknown op 'conv_9x9'"),
      (lambda d: d["normal"]["nodes"][1].__setitem__(0, ["skip_connect", 7]),
       "input 7 is not an earlier node"),
      (lambda d: d["reduce"].__setitem__("concat", [2, 3, 9]),
       "index 9 is out of range"),
      (lambda d: d.pop("reduce"), "missing key 'reduce'"),
  ])
  def test_bad_json(self, tmp_path, mutate, fragment):
    d = IRREGULAR.to_dict()
    mutate(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(GenotypeError, match=fragment) as info:
      genotypes.resolve(str(path))
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)

  def test_missing_file(self, tmp_path):
    with pytest.raises(GenotypeError, match="not found"):
      genotypes.resolve(os.path.join(str(tmp_path), "nothing.json"))


def test_checkpoint_restores_every_weight(tmp_path):
  net = tiny()
  for v in net.weights:
    v.assign(v.numpy() + 1.0)
  path = tf.train.Checkpoint(network=net).save(str(tmp_path / "ckpt"))
  fresh = tiny()
  tf.train.Checkpoint(network=fresh).restore(path).assert_consumed()
  for a, b in zip(net.weights, fresh.weights):
    assert a.path == b.path
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_fixed_edge_genotype():
  # Amended-DARTS fixed edges: node i reads input 0 (cell k-2) and the node
  # just before it.
  def cell(op):
    return CellGenotype(tuple(((op, 0), (op, i + 1)) for i in range(4)))
  g = Genotype(cell("sep_conv_3x3"), cell("max_pool_3x3"))
  net = tiny(g, cells=4, auxiliary=False)
  assert net(images(), training=False).shape == (4, 5)
  assert cost.network_cost(g, "cifar", (8, 8, 3), 5, 4, 4).params == (
      net.count_params_without_auxiliary())
