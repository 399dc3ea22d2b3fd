"""Tests of ChoiceBlock and the ShuffleNetV2 single-path space (DSNAS 4.2)."""

import dataclasses

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tfnas.layers.choice_block import (CHOICE_KERNELS, SHUFFLENET_CHOICES,
                                       ChoiceBlock, block_shuffle,
                                       channel_shuffle)
from tfnas.spaces import shufflenet

CHOICES = SHUFFLENET_CHOICES  # choice_3, choice_5, choice_7, choice_x
# (in_channels, out_channels, stride, input size) of the tiny test blocks.
TINY = {1: (8, 8, 1, 6), 2: (4, 12, 2, 7)}


def _tiny_block(stride, **kwargs):
  c_in, c_out, _, size = TINY[stride]
  block = ChoiceBlock(c_in, c_out, stride, **kwargs)
  x = tf.random.stateless_normal([2, size, size, c_in], seed=[1, stride])
  return block, x


def _build_all(block, x):
  """Creates every candidate's variables with one eager mixed call."""
  k = len(block.choices)
  block(x, weights=tf.fill([k], 1.0 / k), training=False)


def _even_then_odd(z):
  """The official code's channel routing, written out: even channels, then
  odd ones."""
  return tf.concat([z[..., 0::2], z[..., 1::2]], -1)


def _num_params(variables):
  return sum(int(np.prod(v.shape)) for v in variables)


class ChannelShuffleTest(tf.test.TestCase):

  def test_hand_example(self):
    x = tf.reshape(tf.range(8.0), [1, 1, 1, 8])
    self.assertAllEqual(channel_shuffle(x, 2)[0, 0, 0],
                        [0, 4, 1, 5, 2, 6, 3, 7])
    self.assertAllEqual(channel_shuffle(x, 4)[0, 0, 0],
                        [0, 2, 4, 6, 1, 3, 5, 7])
    # Shuffling with C / g groups undoes a shuffle with g groups.
    self.assertAllEqual(channel_shuffle(channel_shuffle(x, 2), 4), x)

  def test_only_channels_move(self):
    # Batch and spatial positions stay put; every pixel's channels are
    # permuted as reshape(g, C/g) -> transpose -> flatten.
    x = np.arange(2 * 3 * 3 * 8, dtype=np.float32).reshape(2, 3, 3, 8)
    expected = x.reshape(2, 3, 3, 2, 4).swapaxes(-1, -2).reshape(2, 3, 3, 8)
    self.assertAllEqual(channel_shuffle(tf.constant(x), 2), expected)

  def test_block_shuffle_puts_even_channels_first(self):
    x = tf.reshape(tf.range(12.0), [1, 1, 1, 12])
    self.assertAllEqual(block_shuffle(x)[0, 0, 0],
                        [0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 11])

  def test_groups_must_divide_channels(self):
    with self.assertRaisesRegex(ValueError, "groups=3 for 8 channels"):
      channel_shuffle(tf.zeros([1, 2, 2, 8]), 3)


class ChoiceBlockTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.product(index=[0, 1, 2, 3], stride=[1, 2])
  def test_output_shape(self, index, stride):
    block, x = _tiny_block(stride)
    y = block(x, index=index, training=True)
    c_out = TINY[stride][1]
    size = 6 if stride == 1 else 4  # ceil(7 / 2) with symmetric padding.
    self.assertEqual(y.shape, (2, size, size, c_out))
    self.assertEqual(block.compute_output_shape(x.shape), y.shape)

  def test_parameter_count_by_hand(self):
    # Trainable: conv kernels plus BN gamma and beta (2 per channel).
    # Stride 1, in = out = 8: the branch maps the half 4 -> 8 - 4 = 4, with
    # mid = out // 2 = 4.
    #   choice_3: pw 4*4 + bn 2*4 + dw 3*3*4 + bn 2*4 + pw 4*4 + bn 2*4
    #           = 16 + 8 + 36 + 8 + 16 + 8 = 92
    #   choice_7: the same with dw 7*7*4 = 196 -> 252
    #   choice_5: the same with dw 5*5*4 = 100 -> 156
    #   choice_x: three units dw 3*3*4 + bn 8 + pw 4*4 + bn 8 = 68 -> 204
    block, x = _tiny_block(1)
    _build_all(block, x)
    stride1 = {"choice_3": 92, "choice_5": 156, "choice_7": 252,
               "choice_x": 3 * 68}
    for name, count in stride1.items():
      self.assertEqual(
          _num_params(block.candidates[name].trainable_variables), count,
          name)
    # Stride 2, in 4 -> out 12: branch 4 -> 12 - 4 = 8, mid = 6; projection
    # 4 -> 4 with the choice's kernel k (3 for choice_x):
    #   dw k*k*4 + bn 8 + pw 4*4 + bn 8.
    #   choice_x branch: dw 3*3*4 + bn 8 + pw 4*6 + bn 12 + dw 3*3*6 + bn 12
    #         + pw 6*6 + bn 12 + dw 3*3*6 + bn 12 + pw 6*8 + bn 16
    #         = 36 + 8 + 24 + 12 + 54 + 12 + 36 + 12 + 54 + 12 + 48 + 16 = 324
    #     projection: 36 + 8 + 16 + 8 = 68
    #   choice_k branch: pw 4*6 + bn 12 + dw k*k*6 + bn 12 + pw 6*8 + bn 16
    #         = 112 + 6 k^2: k = 3: 166, 5: 262, 7: 406
    #     projection: 32 + 4 k^2: k = 3: 68, 5: 132, 7: 228
    block, x = _tiny_block(2)
    _build_all(block, x)
    stride2 = {"choice_3": 166 + 68, "choice_5": 262 + 132,
               "choice_7": 406 + 228, "choice_x": 324 + 68}
    for name, count in stride2.items():
      self.assertEqual(
          _num_params(block.candidates[name].trainable_variables), count,
          name)

  def test_multiply_adds_match_official_dsnas_table(self):
    # SNAS-Series/DSNAS/network.py lists per-block FLOPs (multiply-adds) of
    # the 224 supernet; rows 0 (16 -> 64, stride 2, 112x112 input) and 1
    # (64 -> 64, stride 1, 56x56). Matching them pins down mid = out // 2 and
    # the per-choice projection with the choice's own kernel.
    official = {0: [13396992, 15805440, 19418112, 13146112],
                1: [7325696, 8931328, 11339776, 12343296]}
    specs = shufflenet.ShuffleNetSpaceConfig().blocks()
    for row, expected in official.items():
      c_in, c_out, stride = specs[row]
      block = ChoiceBlock(c_in, c_out, stride)
      _build_all(block, tf.zeros([1, 4, 4, c_in]))
      in_hw = 112 if row == 0 else 56
      macs = []
      for name in CHOICES:
        cand = block.candidates[name]
        total = 0
        for stack in (cand.branch, cand.projection):
          if stack is None:
            continue
          hw = in_hw
          for unit, conv in zip(stack.spec, stack.convs):
            if unit[0] == "dw":
              hw = -(-hw // unit[2])  # Output size after this conv.
            total += int(np.prod(conv.kernel.shape)) * hw * hw
        macs.append(total)
      self.assertEqual(macs, expected, f"block {row}")
    # The analytic table the FLOPs penalty and the export use says the same.
    table = shufflenet.block_costs(shufflenet.ShuffleNetSpaceConfig())
    for row, expected in official.items():
      self.assertEqual(table[row, :, 1].tolist(), expected, f"block {row}")

  def test_strided_depthwise_convs_pad_symmetrically(self):
    # On even inputs TF's 'SAME' pads a stride-2 conv at the bottom/right
    # only; the blocks pad kernel // 2 on every side, as PyTorch does.
    block = ChoiceBlock(4, 12, 2)
    x = tf.random.stateless_normal([2, 8, 8, 4], seed=[3, 8])
    _build_all(block, x)
    for name in CHOICES:
      stack = block.candidates[name].projection
      (dw, pw), (bn_dw, bn_pw) = stack.convs, stack.bns
      k = CHOICE_KERNELS[name]
      pad = [[0, 0], [k // 2, k // 2], [k // 2, k // 2], [0, 0]]
      y = tf.nn.depthwise_conv2d(tf.pad(x, pad), dw.kernel, [1, 2, 2, 1],
                                 "VALID")
      expected = tf.nn.relu(bn_pw(pw(bn_dw(y, training=False)),
                                  training=False))
      self.assertEqual(expected.shape, (2, 4, 4, 4))
      self.assertAllClose(stack(x, training=False), expected, atol=1e-5)
      same = tf.nn.depthwise_conv2d(x, dw.kernel, [1, 2, 2, 1], "SAME")
      self.assertNotAllClose(y, same)  # The conventions differ here.

  def test_unselected_choices_are_never_built(self):
    block, x = _tiny_block(2)
    block(x, index=0, training=True)
    self.assertTrue(block.candidates["choice_3"].built)
    for name in ("choice_5", "choice_7", "choice_x"):
      cand = block.candidates[name]
      self.assertFalse(cand.built, name)
      self.assertFalse(cand.branch.convs[0].built, name)
      self.assertEmpty(cand.variables, name)
    self.assertLen(block.variables,
                   len(block.candidates["choice_3"].variables))

  @parameterized.parameters(0, 1, 2, 3)
  def test_traced_graph_holds_only_the_selected_choice(self, index):
    block, x = _tiny_block(1, shared_functions=False)
    _build_all(block, x)  # Variables exist before tracing.
    fn = tf.function(lambda t: block(t, index=index, training=True))
    graph = fn.get_concrete_function(tf.TensorSpec(x.shape)).graph
    depthwise = [op for op in graph.get_operations()
                 if op.type == "DepthwiseConv2dNative"]
    pointwise = [op for op in graph.get_operations() if op.type == "Conv2D"]
    name = CHOICES[index]
    # choice_x has three depthwise-separable units, the others one.
    self.assertLen(depthwise, 3 if name == "choice_x" else 1)
    self.assertLen(pointwise, 3 if name == "choice_x" else 2)
    kernel = CHOICE_KERNELS[name]
    for op in depthwise:
      self.assertEqual(op.inputs[1].shape[:2], (kernel, kernel))

  @parameterized.parameters(0, 3)
  def test_shared_function_holds_only_the_selected_choice(self, index):
    block, x = _tiny_block(1)
    _build_all(block, x)
    fn = tf.function(lambda t: block(t, index=index, training=True))
    graph_def = fn.get_concrete_function(
        tf.TensorSpec(x.shape)).graph.as_graph_def()
    # A built candidate runs as a shared function: its ops are in the library.
    self.assertNotIn("Conv2D", [n.op for n in graph_def.node])
    types = [n.op for f in graph_def.library.function for n in f.node_def]
    name = CHOICES[index]
    self.assertEqual(types.count("DepthwiseConv2dNative"),
                     3 if name == "choice_x" else 1)
    self.assertEqual(types.count("Conv2D"), 3 if name == "choice_x" else 2)

  def test_shared_and_inline_single_path_agree(self):
    shared, x = _tiny_block(2)
    inline = ChoiceBlock(*TINY[2][:3], shared_functions=False)
    _build_all(shared, x)
    _build_all(inline, x)
    for v, w in zip(inline.variables, shared.variables):
      v.assign(w)
    gate = tf.constant(1.0)
    for index in range(4):
      with tf.GradientTape(persistent=True) as tape:
        tape.watch(gate)
        a = shared(x, index=index, gate=gate, training=True)
        b = inline(x, index=index, gate=gate, training=True)
      self.assertAllClose(a, b, atol=1e-5)
      self.assertAllClose(tape.gradient(a, gate), tape.gradient(b, gate),
                          rtol=1e-4)

  @parameterized.product(index=[1, 3], stride=[1, 2])
  def test_gradients_reach_only_the_chosen_choice_and_the_gate(self, index,
                                                               stride):
    block, x = _tiny_block(stride)
    _build_all(block, x)
    name = CHOICES[index]
    gate = tf.Variable(1.0)
    r = tf.random.stateless_normal(block(x, index=index).shape, seed=[2, 3])
    with tf.GradientTape() as tape:
      out = block(x, index=index, gate=gate, training=True)
      loss = tf.reduce_sum(out * r)
    variables = {n: c.trainable_variables
                 for n, c in block.candidates.items()}
    grads = tape.gradient(loss, [gate, variables])
    gate_grad, var_grads = grads
    for other in CHOICES:
      if other != name:
        self.assertTrue(all(g is None for g in var_grads[other]), other)
    self.assertTrue(all(g is not None and float(tf.reduce_max(tf.abs(g))) > 0
                        for g in var_grads[name]))

    # Independently: the block output o rebuilt without a gate from the
    # candidate's own outputs (branch; at stride 2 also its projection) and,
    # at stride 1, the identity half; the gate multiplies all of o, so
    # ∂L/∂gate = <∂L/∂o, o>.
    half = block.in_channels // 2
    part = x[..., half:] if stride == 1 else x
    with tf.GradientTape() as tape2:
      own = block.candidates[name](part, training=True)
      left = x[..., :half] if stride == 1 else own[0]
      manual = _even_then_odd(tf.concat([left, own[-1]], -1))
      tape2.watch(manual)
      manual_loss = tf.reduce_sum(manual * r)
    self.assertAllClose(manual, out, atol=1e-5)
    expected = tf.reduce_sum(tape2.gradient(manual_loss, manual) * manual)
    self.assertAllClose(gate_grad, expected, rtol=1e-4, atol=1e-4)
    if stride == 1:
      # The identity half is part of the signal: a gate on the branch alone
      # would give another value.
      branch_gate = tf.constant(1.0)
      with tf.GradientTape() as tape3:
        tape3.watch(branch_gate)
        branch_loss = tf.reduce_sum(r * _even_then_odd(tf.concat(
            [x[..., :half], own[-1] * branch_gate], -1)))
      self.assertGreater(
          abs(float(gate_grad - tape3.gradient(branch_loss, branch_gate))),
          1e-3)

  @parameterized.parameters((16, 64), (64, 160), (8, 16))
  def test_blocks_route_channels_as_the_official_code(self, c_in, c_out):
    # The official ShuffleNetV2/SPOS wiring, written out from the candidates:
    # a stride-2 block concatenates its projection and main branch (no
    # shuffle); a stride-1 block sends the even input channels to the
    # identity half and the odd ones to its branch. Projection and main
    # branch differ in width at 16 -> 64 and 64 -> 160 (the first two
    # stages), where a 2-group shuffle would route differently.
    x = tf.random.stateless_normal([2, 5, 5, c_in], seed=[4, c_in])
    blocks = [ChoiceBlock(c_in, c_out, 2), ChoiceBlock(c_out, c_out, 1),
              ChoiceBlock(c_out, c_out, 1)]
    picks = [3, 1, 0]
    y = x
    for block in blocks:  # Every candidate built, on inputs of its shape.
      _build_all(block, y)
      y = block(y, index=0, training=False)
    ours, official = x, None
    for block, k in zip(blocks, picks):
      ours = block(ours, index=k, training=False)
      candidate = block.candidates[block.choices[k]]
      if block.stride == 2:
        official = tf.concat([candidate.projection(x, training=False),
                              candidate.branch(x, training=False)], -1)
      else:
        official = tf.concat(
            [official[..., 0::2],
             candidate(official[..., 1::2], training=False)[-1]], -1)
    # Block by block the output here is the official one with its even
    # channels first; the head's 1x1 conv absorbs that last permutation.
    self.assertAllClose(ours, _even_then_odd(official), atol=1e-5)

  def test_mixed_mode_is_the_weighted_sum(self):
    block, x = _tiny_block(2)
    _build_all(block, x)
    # One-hot weights reproduce the single path (BN in inference mode so the
    # calls see the same statistics).
    for k in range(4):
      self.assertAllClose(
          block(x, weights=tf.one_hot(k, 4), training=False),
          block(x, index=k, training=False), atol=1e-5)
    # A gate scales the chosen candidate exactly like its mixing weight.
    w = tf.constant([0.1, 0.2, 0.3, 0.4])
    self.assertAllClose(
        block(x, index=2, gate=tf.constant(0.3), training=False),
        block(x, weights=tf.one_hot(2, 4) * 0.3, training=False), atol=1e-5)
    self.assertEqual(block(x, weights=w, training=False).shape, (2, 4, 4, 12))

  def test_config_round_trip(self):
    block = ChoiceBlock(8, 8, 1, choices=("choice_x", "choice_3"),
                        mid_channels=6, name="blk")
    clone = ChoiceBlock.from_config(block.get_config())
    self.assertEqual(clone.get_config(), block.get_config())
    self.assertEqual(clone.choices, ("choice_x", "choice_3"))
    self.assertEqual(clone.mid_channels, 6)

  def test_errors_name_the_bad_value(self):
    with self.assertRaisesRegex(ValueError, "stride must be 1 or 2, got 3"):
      ChoiceBlock(8, 8, 3)
    with self.assertRaisesRegex(ValueError, "even in_channels, got 7"):
      ChoiceBlock(7, 7, 1)
    with self.assertRaisesRegex(ValueError, "out_channels=8 <= in_channels=8"):
      ChoiceBlock(8, 8, 2)
    with self.assertRaisesRegex(ValueError, "choice_9"):
      ChoiceBlock(8, 8, 1, choices=("choice_3", "choice_9"))
    block, x = _tiny_block(1)
    with self.assertRaisesRegex(ValueError, "index 4 out of range"):
      block(x, index=4)
    with self.assertRaisesRegex(ValueError, "got neither"):
      block(x)


class ShuffleNetSpaceTest(tf.test.TestCase, parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # One small supernet shared by the tests below (building takes ~2 s).
    cls.space = shufflenet.ShuffleNetSpaceConfig.small()
    keras.utils.set_random_seed(0)
    cls.net = shufflenet.build_shufflenet_supernet(cls.space)

  def test_default_space_has_20_blocks_of_4_choices(self):
    space = shufflenet.ShuffleNetSpaceConfig()
    (group,) = space.decision_groups()
    self.assertEqual(group.name, "blocks")
    self.assertEqual(group.num_decisions, 20)
    self.assertEqual(group.candidates, CHOICES)
    blocks = space.blocks()
    self.assertEqual(blocks[0], (16, 64, 2))
    self.assertEqual(blocks[4], (64, 160, 2))
    self.assertEqual([s for _, _, s in blocks].count(2), 4)

  def test_config_validation(self):
    with self.assertRaisesRegex(ValueError, r"stage_channels\[1\] = 60"):
      shufflenet.ShuffleNetSpaceConfig(stage_channels=(64, 60, 320, 640))
    with self.assertRaisesRegex(ValueError, "equal length"):
      shufflenet.ShuffleNetSpaceConfig(stage_repeats=(1, 1))
    with self.assertRaisesRegex(ValueError, "choice_9"):
      shufflenet.ShuffleNetSpaceConfig(choices=("choice_9",))
    with self.assertRaisesRegex(ValueError, "stem_stride must be 1 or 2, "
                                "got 4"):
      shufflenet.ShuffleNetSpaceConfig(stem_stride=4)
    with self.assertRaisesRegex(ValueError, "dropout must be in"):
      shufflenet.ShuffleNetSpaceConfig(dropout=1.5)
    # Lists (JSON, flags) are normalised to tuples.
    space = shufflenet.ShuffleNetSpaceConfig.small(stage_repeats=[2, 2, 2, 2])
    self.assertEqual(space.stage_repeats, (2, 2, 2, 2))

  @parameterized.parameters(16, 32)
  def test_logits_shape_single_path_and_mixed(self, size):
    images = tf.random.stateless_normal([2, size, size, 3], seed=[0, size])
    path = {"blocks": (0, 1, 2, 3, 0)}
    logits = self.net(images, arch_indices=path, training=True)
    self.assertEqual(logits.shape, (2, self.space.num_classes))
    mixed = tf.fill([self.space.num_blocks, 4], 0.25)
    logits = self.net(images, arch_weights={"blocks": mixed}, training=False)
    self.assertEqual(logits.shape, (2, self.space.num_classes))

  def test_all_variables_exist_before_tracing(self):
    before = len(self.net.variables)
    fn = tf.function(lambda t: self.net(
        t, arch_indices={"blocks": (3, 3, 2, 1, 0)}, training=True))
    fn(tf.zeros([2, 8, 8, 3]))
    self.assertLen(self.net.variables, before)
    self.assertTrue(all(c.built for b in self.net.blocks
                        for c in b.candidates.values()))

  def test_gates_carry_the_search_signal_to_chosen_entries(self):
    path = (1, 0, 3, 2, 1)
    one_hot = tf.one_hot(path, 4)
    images = tf.constant(np.random.default_rng(0).standard_normal(
        [2, 8, 8, 3]), tf.float32)
    labels = tf.constant([1, 2])

    def gate_gradients(training):
      with tf.GradientTape() as tape:
        tape.watch(one_hot)
        logits = self.net(images, arch_weights={"blocks": one_hot},
                          arch_indices={"blocks": path}, training=training)
        loss = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
      grad = tape.gradient(loss, one_hot).numpy()
      # Only the gates (the chosen entries) are in the graph.
      self.assertAllEqual(grad * (1 - one_hot.numpy()), np.zeros([5, 4]))
      return grad[np.arange(5), path]

    # Batch statistics make the loss invariant to the scale of the first
    # block's output but for BN's epsilon (its gate's gradient is ~1e-9, and
    # may round to 0): every later gate gets a gradient.
    self.assertTrue(np.all(gate_gradients(training=True)[1:] != 0))
    # With moving statistics nothing normalises the scale away: every gate.
    self.assertTrue(np.all(gate_gradients(training=False) != 0))

  def test_arch_argument_errors(self):
    images = tf.zeros([1, 8, 8, 3])
    with self.assertRaisesRegex(ValueError, "has 3 entries, expected one per "
                                "block \\(5\\)"):
      self.net(images, arch_indices={"blocks": (0, 1, 2)})
    # Switched indices: a [5] integer tensor.
    for bad, got in ((tf.constant([0, 1]), r"int32 of shape \(2,\)"),
                     (tf.constant(1), r"int32 of shape \(\)"),
                     (tf.zeros([5]), r"float32 of shape \(5,\)")):
      with self.assertRaisesRegex(ValueError, r"as a tensor must be a \[5\] "
                                  r"integer vector .* got " + got):
        self.net(images, arch_indices={"blocks": bad})
    with self.assertRaisesRegex(ValueError, r"shape \(5, 3\)"):
      self.net(images, arch_weights={"blocks": tf.zeros([5, 3])})
    with self.assertRaisesRegex(ValueError, "needs arch_indices"):
      self.net(images)

  def test_config_round_trip(self):
    config = self.net.get_config()
    clone = shufflenet.ShuffleNetSupernet.from_config(config)
    self.assertEqual(clone.space, self.space)
    self.assertEqual(dataclasses.asdict(clone.space), config["space"])

  def test_stem_pool_option(self):
    space = shufflenet.ShuffleNetSpaceConfig.small(
        stage_repeats=(1, 1, 1, 1), stem_stride=2, stem_pool=True)
    net = shufflenet.ShuffleNetSupernet(space)
    logits = net(tf.zeros([1, 16, 16, 3]), arch_indices={"blocks": (0,) * 4})
    self.assertEqual(logits.shape, (1, 10))
    self.assertIsNotNone(net.stem_pool)


if __name__ == "__main__":
  tf.test.main()
