"""Optimizers with the DARTS recipe's exact semantics, distribution-explicit.

Why not ``keras.optimizers``: Keras 3 clips gradients per replica *before*
its own cross-replica sum and applies decoupled weight decay. The recipe of
the papers (PyTorch SGD/Adam) clips the global gradient, then adds coupled
L2 weight decay (``g + wd * w``). The second-order DARTS estimator also needs
all-reduced gradients in the middle of a step. So gradients are all-reduced
by the caller (``tfnas.train.step``) and these optimizers only apply them.

``apply`` may be called in replica context (inside ``strategy.run``): the
update is routed through ``merge_call`` and ``extended.update`` so every
mirrored copy receives the same update.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import tensorflow as tf

from tfnas.train.schedules import constant_schedule


def _variable(v):
  """The tf.Variable behind a Keras 3 variable (or the variable itself)."""
  return getattr(v, "value", v) if not isinstance(v, tf.Variable) else v


def clip_by_global_norm(grads, clip_norm: float | None):
  if not clip_norm:
    return list(grads)
  clipped, _ = tf.clip_by_global_norm(list(grads), clip_norm)
  return clipped


class _Optimizer(tf.Module):
  """Shared machinery: slots, step counter, replica-safe application."""

  def __init__(self, learning_rate, weight_decay: float, clip_norm, name):
    super().__init__(name=name)
    self.learning_rate = (learning_rate if callable(learning_rate)
                          else constant_schedule(learning_rate))
    self.weight_decay = weight_decay
    self.clip_norm = clip_norm
    self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False,
                                  name="iterations")
    self.slots = {}
    self._built_for = None

  def build(self, variables: Sequence, no_decay: Sequence = ()) -> None:
    """Creates slot variables; call inside ``strategy.scope()``.

    ``no_decay``: variables (among ``variables``) that weight decay skips,
    e.g. batch-norm scales and shifts.
    """
    self._built_for = [_variable(v) for v in variables]
    self._position = {id(v): i for i, v in enumerate(self._built_for)}
    skipped = {id(_variable(v)) for v in no_decay}
    unknown = skipped - set(self._position)
    if unknown:
      raise ValueError(f"{self.name}: {len(unknown)} no_decay variable(s) "
                       "are not among the variables to build for")
    self._decays = [0.0 if id(v) in skipped else self.weight_decay
                    for v in self._built_for]
    for slot in self._slot_names:
      self.slots[slot] = [
          tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False,
                      name=f"{slot}_{i}")
          for i, v in enumerate(self._built_for)]

  def current_lr(self):
    return self.learning_rate(self.iterations)

  def decay_of(self, variable) -> float:
    """The coupled L2 coefficient of ``variable`` (0 if built as no_decay)."""
    i = None if self._built_for is None else self._position.get(
        id(_variable(variable)))
    return self.weight_decay if i is None else self._decays[i]

  def prepare(self, grads, variables, active=None):
    """Clip (global norm) then add coupled L2 weight decay, like PyTorch.

    ``active``: optional per-variable ``None`` or boolean scalar tensor;
    an inactive variable's gradient becomes 0 before clipping (so the
    global norm is the active variables'), and gets no decay term.
    """
    active = active or [None] * len(grads)
    # Scalar zeros broadcast: one op per masked gradient.
    grads = [g if a is None else tf.where(a, g, tf.zeros([], g.dtype))
             for g, a in zip(grads, active)]
    grads = clip_by_global_norm(grads, self.clip_norm)
    out = []
    for g, v, a in zip(grads, variables, active):
      decay = self.decay_of(v) if self.weight_decay else 0.0
      if decay:
        term = tf.cast(decay, g.dtype) * tf.convert_to_tensor(v)
        if a is not None:
          term = tf.where(a, term, tf.zeros([], term.dtype))
        g = g + term
      out.append(g)
    return out

  def apply(self, grads, variables, active=None, switches=None) -> None:
    """Applies already all-reduced gradients (same on every replica).

    ``variables`` may be a subset of the built list (a single-path step
    passes only the variables its child used): the others are left exactly
    as they are, slots and weight decay included, as PyTorch does for
    parameters without a gradient. ``active`` does the same at run time: a
    per-variable ``None`` (always updated) or boolean scalar tensor (a
    switched single-path step, whose graph serves every child). The step
    counter advances once.

    ``switches``: optional `Switch` es, the run-time form of ``active`` for
    such a step: of each switch's choices exactly one (its ``index``) has
    its variables updated, the others are left untouched. Traced without a
    strategy, each switch is updated by calls of functions shared by every
    switch of the same structure (its gradients' norm for the clip, then
    the update), whose ``tf.switch_case`` touches only the chosen
    variables: the ~1400 masked per-variable updates of a DARTS supernet
    (~20k graph ops) become 56 calls (one switch per decision), a smaller
    step graph that holds less memory (WORKSPACE_NOTES.md "Single-path
    weight updates and gates"). Elsewhere (eagerly, under a strategy) they
    become ``active`` masks; the result is the same update. An index
    outside the choices updates none of them. Masks and switches do not
    mix; a variable belongs to one choice of one switch at most.
    """
    if self._built_for is None:
      raise RuntimeError(f"{self.name}: call build(variables) before apply")
    if switches:
      _check_switches(self.name, len(variables), active, switches)
    if switches and (tf.executing_eagerly() or tf.distribute.has_strategy()):
      active = _switch_masks(variables, switches)
      switches = None
    positions = []
    for v in variables:
      i = self._position.get(id(_variable(v)))
      if i is None:
        raise ValueError(f"{self.name}: variable {getattr(v, 'path', v.name)}"
                         f" is not among the variables it was built for")
      positions.append(i)
    active = list(active) if active is not None else [None] * len(positions)
    if switches:
      self._apply_switched(grads, positions, switches)
      return
    if tf.executing_eagerly() and not tf.distribute.has_strategy():
      self._apply_eager(grads, positions, active)
      return
    grads = self.prepare(grads, variables, active)
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and tf.distribute.has_strategy():
      ctx.merge_call(self._apply_cross_replica,
                     args=(grads, positions, active))
    else:
      self._apply_cross_replica(tf.distribute.get_strategy(), grads,
                                positions, active)

  def _apply_cross_replica(self, strategy, grads, positions, active):
    lr = self.current_lr()
    step = self.iterations + 1
    # Under a strategy the masks are per-replica values, unwrapped only by
    # ``extended.update``: `_update` derives its arguments there.
    masked = (_MaskedArgs(self, lr) if not tf.distribute.has_strategy() else
              (lambda a: {} if a is None else {"active": a}))
    for i, g, a in zip(positions, grads, active):
      var = self._built_for[i]
      slots = [self.slots[s][i] for s in self._slot_names]
      strategy.extended.update(
          var, self._update, args=(g, lr, step, *slots),
          kwargs=masked(a), group=False)
    strategy.extended.update(self.iterations,
                             lambda v: v.assign_add(1), group=False)

  def _apply_eager(self, grads, positions, active) -> None:
    """Eager `apply` without a strategy: plain per-variable updates.

    ``strategy.extended.update`` costs ~1 ms of Python per variable; a
    single-path step updates a few hundred variables eagerly every step.
    """
    grads = self.prepare(grads, [self._built_for[i] for i in positions],
                         active)
    lr = self.current_lr()
    step = self.iterations + 1
    masked = _MaskedArgs(self, lr)
    for i, g, a in zip(positions, grads, active):
      self._update(self._built_for[i], g, lr, step,
                   *[self.slots[s][i] for s in self._slot_names], **masked(a))
    self.iterations.assign_add(1)

  def _apply_switched(self, grads, positions, switches) -> None:
    """Traced `apply` without a strategy, with ``switches``.

    The same arithmetic as `prepare` + `_update`: the global norm is that of
    the always-updated gradients and the chosen choices' (the others count
    as zeros), the clipped gradient gets its coupled decay, then the plain
    update; each switch's part runs in its shared function.
    """
    switched = {p for sw in switches for choice in sw.choices for p in choice}
    always = [j for j in range(len(positions)) if j not in switched]
    functions = [self._switch_function(sw, positions) for sw in switches]

    def args(sw):
      index = tf.cast(sw.index, tf.int32)
      flat = [p for choice in sw.choices for p in choice]
      return (index, [grads[p] for p in flat],
              [self._built_for[positions[p]] for p in flat],
              [self.slots[s][positions[p]]
               for p in flat for s in self._slot_names])
    switch_args = [args(sw) for sw in switches]
    scale = None
    if self.clip_norm:
      halves = [tf.nn.l2_loss(grads[j]) for j in always]
      halves += [fn[0](*a[:2]) for fn, a in zip(functions, switch_args)]
      norm = tf.sqrt(2.0 * tf.add_n(halves))
      # The scale of tf.clip_by_global_norm (NaN if the norm is not finite).
      scale = self.clip_norm * tf.minimum(
          1.0 / norm, tf.constant(1.0, norm.dtype) / self.clip_norm)
      scale = scale + (norm - norm)
    lr = self.current_lr()
    step = self.iterations + 1
    for j in always:
      i = positions[j]
      var = self._built_for[i]
      self._update(var, _clipped_decayed(grads[j], var, self._decays[i], scale),
                   lr, step, *[self.slots[s][i] for s in self._slot_names])
    one = tf.constant(1.0)
    for fn, (index, g, variables, slots) in zip(functions, switch_args):
      fn[1](index, g, variables, slots, one if scale is None else scale,
            tf.cast(lr, tf.float32), step)
    self.iterations.assign_add(1)

  def _switch_function(self, switch, positions):
    """``(half squared norm, update)`` functions of switches shaped like
    ``switch`` (shared by all such switches of this optimizer). The
    optimizer's hyper-parameters other than the learning rate (momentum,
    betas, epsilon) are read when a function is first traced."""
    decays = [[self._decays[positions[p]] for p in choice]
              for choice in switch.choices]
    key = tuple(tuple((tuple(self._built_for[positions[p]].shape),
                       self._built_for[positions[p]].dtype, d)
                      for p, d in zip(choice, ds))
                for choice, ds in zip(switch.choices, decays))
    cache = self.__dict__.setdefault("_switch_functions", {})
    if key in cache:
      return cache[key]
    sizes = [len(choice) for choice in switch.choices]
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    num_slots = len(self._slot_names)
    dtypes = {self._built_for[positions[p]].dtype
              for choice in switch.choices for p in choice}
    dtype = dtypes.pop() if len(dtypes) == 1 else tf.float32

    def half_norm(index, grads):
      def branch(k):
        part = grads[starts[k]:starts[k] + sizes[k]]
        return lambda: (tf.add_n([tf.nn.l2_loss(g) for g in part]) if part
                        else tf.zeros([], dtype))
      return tf.switch_case(index, [branch(k) for k in range(len(sizes))],
                            default=lambda: tf.zeros([], dtype))

    def update(index, grads, variables, slots, scale, lr, step):
      def branch(k):
        def run():
          for j in range(starts[k], starts[k] + sizes[k]):
            g = _clipped_decayed(grads[j], variables[j],
                                 decays[k][j - starts[k]], scale)
            self._update(variables[j], g, lr, step,
                         *slots[j * num_slots:(j + 1) * num_slots])
          return tf.constant(0)
        return run
      return tf.switch_case(index, [branch(k) for k in range(len(sizes))],
                            default=lambda: tf.constant(0))

    cache[key] = tuple(
        tf.function(f, autograph=False,
                    experimental_attributes={"_noinline": True})
        for f in (half_norm, update))
    return cache[key]

  _slot_names: tuple[str, ...] = ()

  def _masked_kwargs(self, active, lr) -> dict:
    """Keyword arguments of `_update` for variables masked by ``active``
    (computed once per mask, shared by the variables it covers)."""
    del lr
    return {"active": active}

  def _new_values(self, var, grad, lr, step, *slots):
    """``(new var, *new slots)`` from values (pure)."""
    raise NotImplementedError

  def _update(self, var, grad, lr, step, *slots, active=None):
    old = [tf.convert_to_tensor(t) for t in (var, *slots)]
    new = self._new_values(old[0], grad, lr, step, *old[1:])
    for target, before, value in zip((var, *slots), old, new):
      target.assign(value if active is None else
                    tf.where(active, value, before))


def _clipped_decayed(grad, var, decay: float, scale=None):
  """``grad * scale + decay * var`` (`prepare`'s clip, then coupled decay)
  with the clip scale of the whole step; no term when ``scale`` is None or
  ``decay`` is 0."""
  if scale is not None:
    grad = grad * tf.cast(scale, grad.dtype)
  if decay:
    grad = grad + tf.cast(decay, grad.dtype) * tf.convert_to_tensor(var)
  return grad


class Switch(NamedTuple):
  """Variables of which one group, chosen at run time, is updated.

  ``index``: int scalar tensor; ``choices[k]``: positions (in the
  ``variables`` given to `_Optimizer.apply`) of choice k's variables, e.g.
  the weights of candidate op k of one edge of a single-path supernet.
  """
  index: tf.Tensor
  choices: Sequence[Sequence[int]]


def _check_switches(name: str, num_variables: int, active, switches) -> None:
  if active is not None and any(a is not None for a in active):
    raise ValueError(f"{name}: pass either masks (active) or switches")
  seen = set()
  for sw in switches:
    for choice in sw.choices:
      for p in choice:
        if not 0 <= p < num_variables or p in seen:
          raise ValueError(f"{name}: switch position {p} is out of range or "
                           "in more than one choice")
        seen.add(p)


def _switch_masks(variables, switches) -> list:
  """``switches`` (checked by `_check_switches`) as per-variable ``active``
  masks: an index outside the choices matches none of them."""
  active = [None] * len(variables)
  for sw in switches:
    for k, choice in enumerate(sw.choices):
      mask = tf.equal(tf.cast(sw.index, tf.int32), k)
      for p in choice:
        active[p] = mask
  return active


class _MaskedArgs:
  """``masked(active)``: `_update` keyword arguments for a mask, built once
  per distinct mask tensor within one `apply`."""

  def __init__(self, optimizer: _Optimizer, lr):
    self._optimizer = optimizer
    self._lr = lr
    self._cache = {}

  def __call__(self, active) -> dict:
    if active is None:
      return {}
    key = id(active)
    if key not in self._cache:
      self._cache[key] = (active,
                          self._optimizer._masked_kwargs(active, self._lr))
    return self._cache[key][1]


class SGD(_Optimizer):
  """Momentum SGD: ``buf = μ buf + g; w -= lr * buf`` (PyTorch semantics)."""

  _slot_names = ("momentum",)

  def __init__(self, learning_rate, momentum: float = 0.9,
               weight_decay: float = 0.0, clip_norm: float | None = None,
               name: str = "sgd"):
    super().__init__(learning_rate, weight_decay, clip_norm, name)
    self.momentum = momentum

  def momentum_buffer(self, i: int):
    return self.slots["momentum"][i]

  def _new_values(self, var, grad, lr, step, buf):
    new_buf = tf.cast(self.momentum, grad.dtype) * buf + grad
    return var - tf.cast(lr, grad.dtype) * new_buf, new_buf

  def _masked_kwargs(self, active, lr) -> dict:
    """An inactive variable runs the same kernel as the identity: rate 0,
    momentum 1 (its gradient is already 0, see `prepare`)."""
    dtype = lr.dtype if isinstance(lr, tf.Tensor) else tf.float32
    lr = tf.cast(lr, dtype)
    return {"masked": (
        tf.where(active, lr, tf.zeros_like(lr)),
        tf.where(active, tf.constant(self.momentum, dtype),
                 tf.constant(1.0, dtype)))}

  def _update(self, var, grad, lr, step, buf, active=None, masked=None):
    """One fused kernel per variable: ``buf = μ buf + g; w -= lr * buf``.

    TensorFlow's ``ApplyMomentum`` is exactly the PyTorch rule (``accum =
    accum * momentum + grad; var -= lr * accum``). One op instead of two
    reads, four arithmetic ops and two assigns per variable keeps the step
    graph small (a DARTS supernet has ~1400 weight variables), which
    shortens tracing and TF's graph optimisation and lowers its memory.
    ``masked``: ``(rate, momentum)`` of a masked variable
    (`_masked_kwargs`, or derived here from its mask ``active``): an
    inactive one gets rate 0, momentum 1 and gradient 0, so ``buf * 1 + 0``
    and ``w - 0 * buf`` leave both exact.
    """
    del step
    dtype = grad.dtype
    if active is not None:
      masked = self._masked_kwargs(active, lr)["masked"]
    lr = tf.cast(lr, dtype)
    momentum = tf.constant(self.momentum, dtype)
    if masked is not None:
      lr, momentum = (tf.cast(t, dtype) for t in masked)
    tf.raw_ops.ResourceApplyMomentum(
        var=var.handle, accum=buf.handle, lr=lr, grad=grad,
        momentum=momentum, use_locking=False, use_nesterov=False)


class Adam(_Optimizer):
  """Adam with coupled L2 decay (PyTorch ``Adam(weight_decay=...)``)."""

  _slot_names = ("m", "v")

  def __init__(self, learning_rate, beta_1: float = 0.9, beta_2: float = 0.999,
               epsilon: float = 1e-8, weight_decay: float = 0.0,
               clip_norm: float | None = None, name: str = "adam"):
    super().__init__(learning_rate, weight_decay, clip_norm, name)
    self.beta_1 = beta_1
    self.beta_2 = beta_2
    self.epsilon = epsilon

  def _new_values(self, var, grad, lr, step, m, v):
    dtype = grad.dtype
    b1, b2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
    t = tf.cast(step, dtype)
    m_new = b1 * m + (1 - b1) * grad
    v_new = b2 * v + (1 - b2) * tf.square(grad)
    m_hat = m_new / (1 - tf.pow(b1, t))
    v_hat = v_new / (1 - tf.pow(b2, t))
    return (var - tf.cast(lr, dtype) * m_hat /
            (tf.sqrt(v_hat) + tf.cast(self.epsilon, dtype)), m_new, v_new)
