"""Switched single-path DSNAS steps: one traced graph for every child."""

import itertools
from unittest import mock

import keras
import numpy as np
import tensorflow as tf

from tests import helpers
from tfnas.arch import OneHotDistribution
from tfnas.distribute import mirrored_strategy
from tfnas.early_stop import ProgressiveEarlyStop
from tfnas.estimators.dsnas import DsnasEstimator, RewardNormalizer
from tfnas.layers import saved_backward, switch_path
from tfnas.layers.choice_block import ChoiceBlock
from tfnas.layers.mixed_op import MixedOp
from tfnas.train import step_loops


def _context(**kwargs):
  ctx = helpers.tiny_context(**kwargs)
  ctx.distribution = OneHotDistribution(seed=0)
  return ctx


def _state_variables(ctx):
  """``(is α or one of its Adam slots, variable)`` of every variable a step
  may change: the network's (weights, BN statistics) first, then α,
  momentum buffers, α's Adam slots and the step counters."""
  opt = ctx.weight_optimizer
  a_opt = ctx.arch_optimizer
  groups = [(False, ctx.network.variables), (True, ctx.arch_variables),
            (False, opt.slots["momentum"]), (True, a_opt.slots["m"]),
            (True, a_opt.slots["v"]),
            (False, [opt.iterations, a_opt.iterations])]
  return [(arch, v) for arch, variables in groups for v in variables]


def _state(ctx):
  """`_state_variables` as numpy."""
  return [np.asarray(v.numpy()) for _, v in _state_variables(ctx)]


def _arch_state(ctx) -> set[int]:
  """Positions in `_state` of α and its Adam slots."""
  return {i for i, (arch, _) in enumerate(_state_variables(ctx)) if arch}


def _tensors(indices):
  return {g: tf.constant(v, tf.int32) for g, v in indices.items()}


class SwitchedStepTest(tf.test.TestCase):

  def test_switched_steps_equal_eager_child_steps(self):
    # Four steps, four children (with `none` edges): the traced
    # switched step and the eager per-child step leave every weight, BN
    # statistic, momentum buffer, α and Adam slot equal, so unchosen ops
    # stay untouched in both.
    children = [
        {"normal": np.array([3, 1, 2, 3, 3]), "reduce": np.array([1, 3, 3, 2, 3])},
        {"normal": np.array([0, 3, 3, 1, 2]), "reduce": np.array([3, 0, 2, 3, 1])},
        {"normal": np.array([2, 2, 3, 3, 0]), "reduce": np.array([3, 3, 1, 1, 2])},
        # Both edges from s0 `none`: the normal cells' preprocess0 gets a
        # zero gradient (still decayed, as in the papers' code) in both.
        {"normal": np.array([0, 1, 0, 2, 3]), "reduce": np.array([2, 3, 1, 3, 3])},
    ]
    results = []
    # The switched step backpropagates from the tensors its edges kept, or
    # recomputes them (--recompute); both equal the eager steps.
    for switched, recompute in ((False, False), (True, False), (True, True)):
      keras.utils.set_random_seed(1)
      ctx = _context(space=helpers.tiny_space(recompute=recompute))
      est = DsnasEstimator(RewardNormalizer(
          {g.name: g.num_decisions for g in ctx.arch.groups}))
      start = _state(ctx)
      step = tf.function(lambda b, i: est.switch_step(ctx, b, i),
                         autograph=False)
      for s, indices in enumerate(children):
        batch = helpers.batch(classes=3, seed=s)
        if switched:
          step(batch, _tensors(indices))
        else:
          est.child_step(ctx, batch, indices)
      if switched:  # One trace served every child.
        self.assertEqual(step.experimental_get_tracing_count(), 1)
      results.append(_state(ctx))
    eager = results[0]
    arch = _arch_state(ctx)
    for switched in results[1:]:
      changed = 0
      for i, (a, b, s) in enumerate(zip(eager, switched, start)):
        # α's gradient is C_e = dL/dgate (a sum over an edge's output with
        # cancellations) divided by the reward normaliser's std of a few
        # samples: rounding of 1e-7 shows as ~1e-4 there (1.4e-4 seen).
        self.assertAllClose(a, b, atol=2e-5,
                            rtol=1e-3 if i in arch else 1e-4)
        changed += not np.array_equal(a, s)
        if np.array_equal(a, s):  # Untouched by the eager steps: bit-exact.
          self.assertAllEqual(b, s)
      unchanged = len(start) - changed
      self.assertGreater(changed, 10)
      self.assertGreater(unchanged, 10)  # Unchosen ops' weights and slots.

  def test_block_space_switched_steps_equal_eager_child_steps(self):
    # The ShuffleNet space: one switched graph for every child, the eager
    # per-child step's weights, statistics, slots and α (unchosen
    # candidates bit-exact); stride-1 and stride-2 blocks alike.
    space = helpers.replica_block_space()  # Stride 2, stride 2, stride 1.
    # Two steps: tiny BN batches (4 images, 2x2 pixels after two strides)
    # amplify float rounding chaotically after that (1e-4 at step 3).
    children = [np.array(c) for c in ([0, 3, 1], [2, 1, 3])]
    self.assertEqual(len(children[0]), space.num_blocks)
    results = []
    for switched in (False, True):
      keras.utils.set_random_seed(1)
      ctx = helpers.block_context(space)
      # No reward normalisation: its std from one or two samples scales
      # the α-gradient (a sum over the block output with cancellations) by
      # ~1e4, which rounding differences of 1e-6 then show.
      est = DsnasEstimator()
      start = _state(ctx)
      step = tf.function(lambda b, i: est.switch_step(ctx, b, i),
                         autograph=False)
      for s, blocks in enumerate(children):
        batch = helpers.batch(classes=3, seed=s)
        if switched:
          step(batch, _tensors({"blocks": blocks}))
        else:
          est.child_step(ctx, batch, {"blocks": blocks})
      if switched:
        self.assertEqual(step.experimental_get_tracing_count(), 1)
      results.append(_state(ctx))
    eager, switched = results
    for a, b in zip(eager, switched):
      self.assertAllClose(a, b, atol=2e-5, rtol=1e-4)
    # Candidates no step chose: weights and BN statistics bit-exact.
    chosen = {(b, int(c[b])) for c in children for b in range(len(c))}
    unchosen = {id(v) for b, block in enumerate(ctx.network.blocks)
                for k, name in enumerate(block.choices)
                if (b, k) not in chosen
                for v in block.candidates[name].variables}
    checked = trained = 0
    for v, a, b, s in zip(ctx.network.variables, eager, switched, start):
      if id(v) in unchosen:
        self.assertAllEqual(a, s)
        self.assertAllEqual(b, s)
        checked += 1
      else:  # Chosen or shared.
        trained += not np.array_equal(b, s)
    self.assertGreater(checked, 10)
    self.assertGreater(trained, 10)

  def test_choice_block_switched_call_equals_the_chosen_candidate(self):
    net = helpers.block_context().network
    blocks = (net.blocks[0], net.blocks[3])
    self.assertEqual([b.stride for b in blocks], [2, 1])
    for block in blocks:
      self.assertIsInstance(block, ChoiceBlock)
      x = tf.random.normal([4, 8, 8, block.in_channels], seed=3)

      def r_of(y):
        return tf.random.stateless_normal(tf.shape(y), [5, 6])

      @tf.function
      def run(x, i, g, block=block):
        with tf.GradientTape() as tape:
          tape.watch([x, g])
          y = block(x, index=i, gate=g, training=True)
          loss = tf.reduce_sum(y * r_of(y))
        return y, tape.gradient(loss, [x, g] + block.trainable_variables)
      for k in range(len(block.choices)):
        for gate in (1.0, 0.7):
          before = [v.numpy() for v in block.non_trainable_variables]
          y, grads = run(x, tf.constant(k), tf.constant(gate))
          after = [v.numpy() for v in block.non_trainable_variables]
          for v, b in zip(block.non_trainable_variables, before):
            v.assign(b)
          g = tf.constant(gate)
          with tf.GradientTape() as tape:
            tape.watch([x, g])
            want_y = block(x, index=k, gate=g, training=True)
            r = r_of(want_y)
            loss = tf.reduce_sum(want_y * r)
          want = tape.gradient(loss, [x, g] + block.trainable_variables)
          want = [tf.zeros_like(v) if w is None else w
                  for v, w in zip([x, g] + block.trainable_variables, want)]
          self.assertAllClose(y, want_y, atol=1e-5)
          self.assertAllClose(grads[0], want[0], atol=1e-4)
          self.assertAllClose(grads[1], want[1], atol=1e-3, rtol=1e-4)
          chosen = {id(v) for v in
                    block.candidates[block.choices[k]].trainable_variables}
          for v, got, w in zip(block.trainable_variables, grads[2:],
                               want[2:]):
            if id(v) not in chosen:
              self.assertAllEqual(got, tf.zeros_like(v))
            self.assertAllClose(got, w, atol=1e-4)
          # The chosen candidate's statistics moved as inline.
          for a, b in zip(after, block.non_trainable_variables):
            self.assertAllClose(a, b, atol=1e-6)
      self.assertEqual(run.experimental_get_tracing_count(), 1)
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                "index out of range for 4 choices"):
      blocks[-1](x, index=tf.constant(4), training=True)

  def test_only_the_chosen_branch_runs_and_gets_gradients(self):
    ctx = _context()
    net = ctx.network
    op = next(m for m in net.cells[0].mixed_ops if m.stride == 1)
    self.assertIsInstance(op, MixedOp)
    x = tf.random.normal([4, 8, 8, op.channels], seed=3)
    branch_vars = switch_path.branch_variables(op)
    sep = op.edge_ops.index("sep_conv_3x3")
    # A random projection: sum(y * y) is nearly constant after a BN.
    r = tf.random.normal([4, 8, 8, op.channels], seed=4)
    # Gate 1 (DSNAS) skips multiplying by it; another value may not.
    # Both backward forms: from the kept tensors, and recomputed. A spy on
    # `saved_backward.backward` tells which one each traced pair uses.
    switch_path.clear()
    spy = self.enter_context(mock.patch.object(
        saved_backward, "backward", wraps=saved_backward.backward))
    cases = [(k, 1.0) for k in range(len(op.edge_ops))] + [
        (sep, 0.7), (op.edge_ops.index("none"), 0.7)]
    for (k, gate), recompute in itertools.product(cases, (False, True)):
      calls = spy.call_count
      index = op.candidates.index(op.edge_ops[k])
      before = [v.numpy() for v in op.non_trainable_variables]
      weights = gate * tf.one_hot(index, len(op.candidates))

      @tf.function
      def run(x, i, weights):
        with tf.GradientTape() as tape:
          tape.watch([x, weights])
          y = op(x, weights, index=i, training=True, recompute=recompute)
          loss = tf.reduce_sum(y * r)
        return y, tape.gradient(loss, [x, weights] + op.trainable_variables)
      y, grads = run(x, tf.constant(index), weights)
      if recompute:
        self.assertEqual(spy.call_count, calls)
      d_weights = tf.convert_to_tensor(grads.pop(1))  # From a gather.
      inline = op.ops[op.edge_ops[k]]
      for v, b in zip(op.non_trainable_variables, before):
        v.assign(b)  # The switched call updated the chosen op's statistics.
      with tf.GradientTape() as tape:
        tape.watch(x)
        ungated = inline(x, training=True)
        expected = ungated * gate
        loss = tf.reduce_sum(expected * r)
      want = tape.gradient(loss, [x] + inline.trainable_variables)
      self.assertAllClose(y, expected, atol=1e-5)
      # d loss / d gate = sum(r * op output); zero for the other entries.
      self.assertAllClose(
          d_weights, tf.one_hot(index, len(op.candidates)) *
          tf.reduce_sum(r * ungated), atol=1e-4, rtol=1e-5)
      self.assertAllClose(grads[0], want[0], atol=1e-4)
      chosen = {id(v) for v in branch_vars[k]}
      got = dict(zip(map(id, op.trainable_variables), grads[1:]))
      for v in op.trainable_variables:
        if id(v) not in chosen:
          self.assertAllEqual(got[id(v)], tf.zeros_like(v))
      for v, g in zip(inline.trainable_variables, want[1:]):
        self.assertAllClose(got[id(v)], g, atol=1e-4)
      if k == sep:
        self.assertGreater(float(tf.reduce_max(tf.abs(grads[-1]))), 0.0)
    # The kept form backpropagated every op that has weights or a batch
    # norm from kept tensors (its `none` branch has nothing to keep).
    kept_ops = {id(c.args[0]) for c in spy.call_args_list}
    for name in op.edge_ops:
      self.assertEqual(id(op.ops[name]) in kept_ops, name != "none", name)
    # Without weights there is no gate: the op's output and gradients.
    index = op.candidates.index("sep_conv_3x3")

    @tf.function
    def ungated(x, i):
      with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(op(x, index=i, training=True) * r)
      return tape.gradient(loss, x)
    before = [v.numpy() for v in op.non_trainable_variables]
    dx = ungated(x, tf.constant(index))
    for v, b in zip(op.non_trainable_variables, before):
      v.assign(b)
    with tf.GradientTape() as tape:
      tape.watch(x)
      loss = tf.reduce_sum(op.ops["sep_conv_3x3"](x, training=True) * r)
    self.assertAllClose(dx, tape.gradient(loss, x), atol=1e-4)

  def test_noise_edge_gate_gradient_reads_the_forward_sample(self):
    # `noise` draws anew on every call: even with --recompute its backward
    # must not run it again, or the gate's gradient sum(dy * y) would read
    # another sample than the one the loss saw. (A seeded run may give the
    # forward and a recomputing backward kernel equal seeds, hence equal
    # samples, so the spy checks that the kept output is what is used.)
    op = MixedOp(4, 1, ("none", "noise", "sep_conv_3x3"))
    x = tf.random.normal([2, 8, 8, 4], seed=1)
    op(x, weights=tf.fill([3], 1 / 3), training=True)  # Builds every op.
    r = tf.random.normal([2, 8, 8, 4], seed=2)
    switch_path.clear()
    spy = self.enter_context(mock.patch.object(
        saved_backward, "backward", wraps=saved_backward.backward))
    for recompute in (False, True):
      @tf.function
      def run(x, weights):
        with tf.GradientTape() as tape:
          tape.watch(weights)
          y = op(x, weights, index=tf.constant(1), training=True,
                 recompute=recompute)
          loss = tf.reduce_sum(y * r)
        return y, tape.gradient(loss, weights)
      spy.reset_mock()
      y, d_weights = run(x, tf.one_hot(1, 3))
      self.assertGreater(float(tf.math.reduce_std(y)), 0.5)  # Noise.
      d_weights = tf.reshape(tf.convert_to_tensor(d_weights), [-1])
      self.assertAllClose(d_weights, [0.0, float(tf.reduce_sum(y * r)), 0.0],
                          rtol=1e-5, atol=1e-4)
      from_kept = {id(c.args[0]) for c in spy.call_args_list}
      self.assertIn(id(op.ops["noise"]), from_kept)
      self.assertEqual(id(op.ops["sep_conv_3x3"]) in from_kept,
                       not recompute)

  def test_mirrored_switched_step_equals_eager_child_step(self):
    # Two replicas (per-replica BN, so both sides run mirrored): the
    # switched step traced under MirroredStrategy gives the eager child
    # step's update, with early stop's restore in the step too.
    children = [{"normal": np.array([2, 1]), "reduce": np.array([1, 2])},
                {"normal": np.array([0, 2]), "reduce": np.array([2, 0])}]
    strategy = mirrored_strategy(["/cpu:0", "/cpu:1"])

    def context():
      ctx = _context(space=helpers.replica_space())
      ctx.fixed_decisions = ProgressiveEarlyStop(ctx.arch, threshold=0.3)
      return ctx

    def run(switched, init=None):
      ctx, _ = _mirrored_steps(strategy, context, children, switched, init)
      trained = [np.asarray(v.numpy())
                 for v in ctx.weight_variables + ctx.arch_variables]
      # BN statistics too (they start at their defaults in every context).
      stats = [np.asarray(v.numpy())
               for v in ctx.network.non_trainable_variables]
      return trained, stats

    init, _ = run(False)
    eager, eager_stats = run(False, init)
    switched, switched_stats = run(True, init)
    self.assertGreater(max(np.abs(a - b).max()
                           for a, b in zip(eager, init)), 1e-4)
    for a, b in zip(eager, switched):
      self.assertAllClose(a, b, atol=2e-5, rtol=1e-4)
    self.assertGreater(max(np.abs(s - np.round(s)).max()
                           for s in eager_stats), 1e-3)  # They moved.
    for a, b in zip(eager_stats, switched_stats):
      self.assertAllClose(a, b, atol=2e-5, rtol=1e-4)

  def test_mirrored_block_space_switched_step_equals_eager_child_step(self):
    # The ShuffleNet space under two replicas (per-replica BN): stride-2
    # and stride-1 blocks, statistics assigned by the caller. One step (the
    # one-replica test above takes several).
    children = [{"blocks": np.array([2, 1, 3])}]
    strategy = mirrored_strategy(["/cpu:0", "/cpu:1"])

    def run(switched):
      keras.utils.set_random_seed(1)
      ctx, start = _mirrored_steps(
          strategy, lambda: helpers.block_context(
              helpers.replica_block_space()), children, switched)
      return start, [np.asarray(v.numpy())
                     for v in ctx.network.variables + ctx.arch_variables]

    start, eager = run(False)
    start_switched, switched = run(True)
    for a, b in zip(start, start_switched):
      self.assertAllEqual(a, b)
    moved = sum(not np.array_equal(a, b) for a, b in zip(start, eager))
    self.assertGreater(moved, 10)
    for a, b in zip(eager, switched):
      self.assertAllClose(a, b, atol=2e-5, rtol=1e-4)


def _mirrored_steps(strategy, make_context, children, switched, init=None):
  """Builds ``make_context()`` and a DSNAS estimator under ``strategy``,
  sets the weights and α to ``init`` if given, then runs one step per child
  (group -> indices) on a batch of 4 split over the replicas: the traced
  switched step, or the eager child step. Returns the context and the
  network's variables (BN statistics included) as they were before the
  steps."""
  with strategy.scope():
    ctx = make_context()
    est = DsnasEstimator()
  for v, value in zip(ctx.weight_variables + ctx.arch_variables, init or []):
    v.assign(value)
  start = [np.asarray(v.numpy()) for v in ctx.network.variables]
  step = step_loops.compiled_replica_step(
      strategy, lambda t, v, i: est.switch_step(ctx, t, i))
  for s, indices in enumerate(children):
    batch = helpers.batch(n=4, classes=3, seed=s)
    for b in strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors(batch)):
      if switched:
        step((b, None, _tensors(indices)))
      else:
        strategy.run(est.child_step, args=(ctx, b, indices))
  return ctx, start


if __name__ == "__main__":
  tf.test.main()
