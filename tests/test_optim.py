"""The recipe's optimizers against hand-computed PyTorch-semantics updates."""

import numpy as np
import tensorflow as tf

from tfnas.distribute import mirrored_strategy
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

  def test_sgd_in_graph_and_mirrored_equals_eager(self):
    """The fused momentum kernel: same numbers traced, mirrored, float64."""
    g = np.array([[6.0, 8.0], [-1.0, 0.5]])
    def run(dtype, strategy=None, compiled=False):
      strategy = strategy or tf.distribute.get_strategy()
      with strategy.scope():
        ws = [tf.Variable(tf.constant([3.0, 4.0], dtype)),
              tf.Variable(tf.constant([-1.0, 2.0], dtype))]
        opt = optim.SGD(0.1, momentum=0.9, weight_decay=0.01, clip_norm=1.0)
        opt.build(ws)
      def step():
        opt.apply([tf.constant(r, dtype) for r in g], ws)
      if compiled:
        step = tf.function(step)
      for _ in range(3):
        if strategy is tf.distribute.get_strategy():
          step()
        else:
          strategy.run(step)
      return [w.numpy() for w in ws] + [opt.momentum_buffer(1).numpy()]
    # Hand-computed reference (clip by the global norm, coupled decay).
    w = [np.array([3.0, 4.0]), np.array([-1.0, 2.0])]
    buf = [np.zeros(2), np.zeros(2)]
    scale = min(1.0, 1.0 / np.sqrt((g ** 2).sum()))
    for _ in range(3):
      for i in range(2):
        buf[i] = 0.9 * buf[i] + scale * g[i] + 0.01 * w[i]
        w[i] = w[i] - 0.1 * buf[i]
    expected = w + [buf[1]]
    self.assertAllClose(run(tf.float64), expected, rtol=1e-12)
    self.assertAllClose(run(tf.float32, compiled=True), expected, rtol=1e-6)
    mirrored = mirrored_strategy(["/cpu:0", "/cpu:1"])
    self.assertAllClose(run(tf.float32, mirrored, compiled=True), expected,
                        rtol=1e-6)

  def test_masked_apply_skips_inactive_variables_exactly(self):
    """A run-time mask (switched single-path steps): inactive variables and
    their slots stay bit-for-bit, active ones get the unmasked update, and
    clipping sees the inactive gradients as zero; eager, traced, mirrored,
    for SGD and Adam."""
    g = [np.array([6.0, 8.0]), np.array([-1.0, 0.5]), np.array([2.0, 2.0])]
    def run(make, mask, strategy=None, compiled=False):
      strategy = strategy or tf.distribute.get_strategy()
      with strategy.scope():
        ws = [tf.Variable([3.0, 4.0]), tf.Variable([-1.0, 2.0]),
              tf.Variable([0.5, 0.5])]
        opt = make()
        opt.build(ws)
      def step(flags):
        active = [None, flags[0], flags[1]]
        grads = [tf.constant(r, tf.float32) for r in g]
        if mask:
          opt.apply(grads, ws, active=active)
        else:  # The reference: only the active variables, as a subset.
          keep = [i for i, a in enumerate(mask_values) if a]
          opt.apply([grads[i] * 1.0 if i in keep else grads[i] * 0.0
                     for i in keep], [ws[i] for i in keep])
      if compiled:
        step = tf.function(step)
      for flags in ([True, False], [False, True], [True, False]):
        mask_values[:] = [True, *flags]
        if strategy is tf.distribute.get_strategy():
          step(tf.constant(flags))
        else:
          strategy.run(step, args=(tf.constant(flags),))
      slots = [s.numpy() for name in opt.slots for s in opt.slots[name]]
      return [w.numpy() for w in ws] + slots

    mask_values = []
    for make in (lambda: optim.SGD(0.1, momentum=0.9, weight_decay=0.01),
                 lambda: optim.Adam(0.1, weight_decay=0.01)):
      expected = run(make, mask=False)
      self.assertAllEqual(run(make, mask=True), expected)
      self.assertAllClose(run(make, mask=True, compiled=True), expected,
                          rtol=1e-6)
      mirrored = mirrored_strategy(["/cpu:0", "/cpu:1"])
      self.assertAllClose(run(make, True, mirrored, compiled=True), expected,
                          rtol=1e-6)
    # With clipping, the masked global norm counts active gradients only.
    clipped = optim.SGD(1.0, momentum=0.0, clip_norm=1.0)
    w = [tf.Variable([0.0, 0.0]), tf.Variable([0.0])]
    clipped.build(w)
    clipped.apply([tf.constant([3.0, 4.0]), tf.constant([100.0])], w,
                  active=[None, tf.constant(False)])
    self.assertAllClose(w[0].numpy(), [-0.6, -0.8])
    self.assertAllEqual(w[1].numpy(), [0.0])

  def test_switched_apply_updates_only_the_chosen_choice(self):
    """`Switch`es (one choice of each updated, picked at run time) give the
    update of the chosen variables alone, with clipping over the chosen
    gradients and coupled decay; the others and their slots stay exact.
    Traced (shared functions), eager and mirrored (masks), SGD and Adam,
    clipped or not, with and without decay (one variable exempt); an index
    past the choices updates none of them."""
    shapes = [(2,), (2,), (2, 2), (3,), (2,), (2, 2), (3,)]
    rng = np.random.default_rng(0)
    inits = [rng.standard_normal(s) for s in shapes]
    grads_np = [4.0 * rng.standard_normal(s) for s in shapes]
    # Variable 0 always; switches over [[1, 2], [], [3]] and [[4, 5], [], [6]].
    choices = ([[1, 2], [], [3]], [[4, 5], [], [6]])
    draws = ([0, 2], [1, 0], [2, 2], [0, 1], [3, 1])

    def run(make, mode, strategy=None):
      strategy = strategy or tf.distribute.get_strategy()
      with strategy.scope():
        ws = [tf.Variable(v, dtype=tf.float32) for v in inits]
        opt = make()
        opt.build(ws, no_decay=[ws[3]])
      grads = [tf.constant(g, tf.float32) for g in grads_np]

      def switched(idx):
        opt.apply(grads, ws, switches=[
            optim.Switch(idx[0], choices[0]), optim.Switch(idx[1], choices[1])])
      def state():
        return [[w.numpy()] + [opt.slots[n][i].numpy() for n in opt.slots]
                for i, w in enumerate(ws)]
      for draw in draws:
        keep = [0] + [p for c, d in zip(choices, draw) if d < len(c)
                      for p in c[d]]
        before = state()
        if mode == "reference":  # The chosen variables as a subset.
          opt.apply([grads[i] for i in keep], [ws[i] for i in keep])
        elif mode == "eager":
          switched(tf.constant(draw))
        elif strategy is tf.distribute.get_strategy():
          tf.function(switched)(tf.constant(draw))
        else:
          strategy.run(tf.function(switched), args=(tf.constant(draw),))
        after = state()
        for i in range(len(ws)):  # Not chosen: bit-for-bit, slots too.
          if i not in keep:
            for x, y in zip(before[i], after[i]):
              self.assertAllEqual(x, y)
          else:
            self.assertNotAllClose(before[i][0], after[i][0])
      if mode == "traced" and strategy is tf.distribute.get_strategy():
        # Switches of one structure share a pair of functions, each traced
        # once; with decay on, variable 3's exemption tells the two apart.
        self.assertLen(opt._switch_functions, 2 if opt.weight_decay else 1)
        for norm, update in opt._switch_functions.values():
          self.assertEqual(norm.experimental_get_tracing_count(),
                           1 if opt.clip_norm else 0)  # Norm: clip only.
          self.assertEqual(update.experimental_get_tracing_count(), 1)
      slots = [s.numpy() for name in opt.slots for s in opt.slots[name]]
      return [w.numpy() for w in ws] + slots + [opt.iterations.numpy()]

    for make in (lambda: optim.SGD(0.1, momentum=0.9, weight_decay=0.01,
                                   clip_norm=1.0),
                 lambda: optim.SGD(0.1, momentum=0.9),
                 lambda: optim.Adam(0.1, weight_decay=0.01, clip_norm=1.0),
                 lambda: optim.Adam(0.1, clip_norm=100.0)):
      expected = run(make, "reference")
      mirrored = mirrored_strategy(["/cpu:0", "/cpu:1"])
      for got, exact in ((run(make, "eager"), True),
                         (run(make, "traced"), False),
                         (run(make, "traced", mirrored), False)):
        for x, y in zip(got, expected):
          if exact:
            self.assertAllEqual(x, y)
          else:
            self.assertAllClose(x, y, rtol=1e-6)

  def test_switches_refuse_masks_and_shared_positions(self):
    ws = [tf.Variable([1.0]), tf.Variable([2.0])]
    opt = optim.SGD(0.1)
    opt.build(ws)
    grads = [tf.constant([1.0]), tf.constant([1.0])]
    with self.assertRaisesRegex(ValueError, "either masks"):
      opt.apply(grads, ws, active=[tf.constant(True), None],
                switches=[optim.Switch(0, [[1], []])])
    with self.assertRaisesRegex(ValueError, "more than one choice"):
      opt.apply(grads, ws, switches=[optim.Switch(0, [[1], [1]])])

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

  def test_no_decay_variables_skip_weight_decay_only(self):
    """With zero gradients only decayed variables move, eagerly, traced and
    in the second-order virtual step's coefficient."""
    w, gamma = tf.Variable([3.0, 4.0]), tf.Variable([1.0, 2.0])
    opt = optim.SGD(0.1, momentum=0.9, weight_decay=0.01)
    opt.build([w, gamma], no_decay=[gamma])
    self.assertEqual((opt.decay_of(w), opt.decay_of(gamma)), (0.01, 0.0))
    zeros = [tf.zeros(2), tf.zeros(2)]
    opt.apply(zeros, [w, gamma])
    tf.function(lambda: opt.apply(zeros, [w, gamma]))()
    w1 = np.array([3.0, 4.0]) * (1 - 0.1 * 0.01)
    self.assertAllClose(w, w1 - 0.1 * (0.9 * 0.01 * np.array([3.0, 4.0]) +
                                       0.01 * w1))
    self.assertAllClose(gamma, [1.0, 2.0])
    with self.assertRaisesRegex(ValueError, "no_decay"):
      optim.SGD(0.1).build([w], no_decay=[gamma])

  def test_apply_requires_build(self):
    with self.assertRaisesRegex(RuntimeError, "build"):
      optim.SGD(0.1).apply([tf.ones(2)], [tf.Variable([0.0, 0.0])])


if __name__ == "__main__":
  tf.test.main()
