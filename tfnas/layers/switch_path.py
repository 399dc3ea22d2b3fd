"""Single-path edges whose op is chosen at run time inside one graph.

A single-path step (DSNAS) meets a new child almost every step. Tracing one
graph per child costs seconds per step; running the chosen ops eagerly pays
a per-call cost on every edge (WORKSPACE_NOTES.md, "The bound on any
single-path step"). `call_switch` instead lets ONE traced step serve every
child: the edge's op index is a tensor, and the edge runs as a call of two
functions shared by every edge of the same structure (a DARTS-space
`MixedOp`; a ShuffleNet `ChoiceBlock`, whose candidates are its ops, works
the same way):

* forward ``(x, index, values, gate) -> (y * gate, new statistics, kept)``:
  ``tf.switch_case`` over the edge's ops; only the chosen branch executes;
* backward ``(x, index, dy, values, gate, kept) -> (d gate, dx, d values)``:
  the same switch; the chosen branch backpropagates through its op (zeros
  for the other ops' weights).

The backward branch either reads the tensors its forward branch kept
(``kept``: each conv's and batch norm's input, `saved_backward`), which
costs no forward work again, or, with ``recompute`` (``--recompute``) and for
ops `saved_backward` does not handle, recomputes the op's forward pass and
keeps nothing. An op with a random output (``random_output``: `noise`) keeps
it in both forms: run again, it would draw another sample. Either way the
gate's gradient ``sum(dy * y)`` needs no copy of the edge's output: it comes
from the recomputed ``y``, or from the last
batch norm's scale and shift gradients (`saved_backward`). In the DARTS
CIFAR configuration kept tensors make the step ~15% faster for ~0.7 GiB more
peak memory (WORKSPACE_NOTES.md, "Kept tensors instead of recomputation").

Both are kept as real function calls (``_noinline``): inlined into the step,
every branch of every edge would join one huge graph (a probe of the DARTS
CIFAR configuration: 4 GiB and 26 s to instantiate, against 1.6 GiB and 8 s
as calls), while as calls each is instantiated once per structure and the
step runs close to a graph traced for one fixed child (WORKSPACE_NOTES.md,
"One graph for every child"). With ``recompute`` the forward call keeps no
activations (the backward one recomputes them), so memory is that of the
edge inputs (WORKSPACE_NOTES.md, "Single-path weight updates and gates").

Kept tensors are used in training mode only, and only where every batch
norm of the op takes the fused kernel: in inference, in float64 and with
batch norms synchronized across replicas the chosen op is recomputed.

BatchNorm statistics: with one replica they go in as variables and the
chosen branch assigns its op's. Under a tf.distribute strategy (a mirrored
assign must synchronise replicas from the caller) every branch returns the
current values of all the edge's statistics (the chosen op's updated, the
others as they came in) and the caller assigns them all.
"""

from __future__ import annotations

import threading
import weakref
import keras
import tensorflow as tf
# The public API has no tape-wide "stop recording"; tf.recompute_grad uses
# this same internal.
from tensorflow.python.eager import record

from tfnas import ops
from tfnas.layers import saved_backward
from tfnas.layers.shared_function import (current_value, structure_key,
                                          tf_variable)

_LOCK = threading.Lock()
_FUNCTIONS: dict[tuple, tuple] = {}
_NO_INLINE = {"_noinline": True}


def _branch_layers(layer) -> list[keras.layers.Layer]:
  """The layer's choices in candidate order (``layer.switch_branches``)."""
  return list(layer.switch_branches())


def _make_functions(template, training: bool, assign_inside: bool,
                    use_kept: bool):
  template_ref = weakref.ref(template)  # The cache must not keep nets alive.
  # Per choice, the static shapes of the tensors its forward branch keeps,
  # None where it keeps none and backward recomputes (recorded when forward
  # is traced and read, not decided again, when backward is).
  kept_shapes: dict[int, list[tf.TensorShape] | None] = {}

  def parts():
    layer = template_ref()
    variables = list(layer.variables)
    stats = [i for i, v in enumerate(variables) if not v.trainable]
    return layer, variables, stats

  def keeps(op, x) -> bool:
    # An op with a random output (`noise`) keeps it even when recomputing
    # is asked for: run again it would draw another sample for the gate.
    wanted = use_kept or (training and ops.draws_anew(op))
    return wanted and saved_backward.supported(op, x)

  def forward(x, index, values, gate):
    layer, variables, stats = parts()
    branches = _branch_layers(layer)
    slots = max([saved_backward.num_kept(op) for op in branches
                 if keeps(op, x)] + [0])

    def branch(k, op):
      def run():
        with keras.StatelessScope(list(zip(variables, values))) as scope:
          if keeps(op, x):
            y, kept = saved_backward.forward(op, x)
            kept_shapes[k] = [t.shape for t in kept]
          else:
            y, kept = op(x, training=training), []
            kept_shapes[k] = None
          new = [scope.get_current_value(variables[i]) for i in stats]
        # Every branch returns as many tensors; the unused are empty.
        kept = kept + [tf.zeros([0])] * (slots - len(kept))
        if not assign_inside:
          return [y] + [tf.convert_to_tensor(v) for v in new] + kept
        # Statistics came in as variables: the chosen op assigns its own.
        for i, value in zip(stats, new):
          if value is not values[i]:
            values[i].assign(value)
        return [y] + kept
      return run
    out = tf.switch_case(index, [branch(k, op)
                                 for k, op in enumerate(branches)])
    num_stats = 0 if assign_inside else len(stats)
    return (_gated(out[0], gate), out[1:1 + num_stats],
            out[1 + num_stats:])

  def backward(x, index, dy, values, gate, kept):
    layer, variables, _ = parts()
    trainable = [i for i, v in enumerate(variables) if v.trainable]

    dy_gated = _gated(dy, gate)

    def branch(k, op):
      def recomputed():
        watched = [values[i] for i in trainable]
        if getattr(op, "output_is_zero", False):
          # `none`: nothing to recompute; every gradient is zero.
          return ([tf.zeros([], gate.dtype), tf.zeros_like(x)] +
                  [tf.zeros_like(w) for w in watched])
        with tf.GradientTape() as tape:
          tape.watch([x] + watched)
          with keras.StatelessScope(list(zip(variables, values))):
            y = op(x, training=training)
        grads = tape.gradient(
            y, [x] + watched, output_gradients=dy_gated,
            unconnected_gradients=tf.UnconnectedGradients.ZERO)
        d_gate = tf.cast(tf.reduce_sum(dy * y), gate.dtype)
        return [d_gate] + grads

      def from_kept():
        shapes = kept_shapes[k]
        parts_k = [_with_shape(t, s) for t, s in zip(kept, shapes)]
        with keras.StatelessScope(list(zip(variables, values))) as scope:
          dx, grads, dot = saved_backward.backward(
              op, x, parts_k, dy_gated, scope.get_current_value)

          def recomputed_dot():  # sum(dy * y) for a gate other than 1.
            return tf.reduce_sum(dy * op(x, training=training))
          # `dot` is sum(dy_gated * y) = gate * sum(dy * y).
          d_gate = tf.cond(tf.equal(gate, 1), lambda: tf.identity(dot),
                           recomputed_dot)
        return ([tf.cast(d_gate, gate.dtype), dx] +
                [grads[id(variables[i])] if id(variables[i]) in grads
                 else tf.zeros_like(values[i]) for i in trainable])
      return recomputed if kept_shapes[k] is None else from_kept
    return tf.switch_case(index, [branch(k, op) for k, op in
                                  enumerate(_branch_layers(layer))])

  return (tf.function(forward, autograph=False,
                      experimental_attributes=_NO_INLINE),
          tf.function(backward, autograph=False,
                      experimental_attributes=_NO_INLINE))


def _with_shape(t: tf.Tensor, shape: tf.TensorShape) -> tf.Tensor:
  """``t`` with the static shape its branch gave it (a switch's outputs
  have only the shape its branches agree on)."""
  if shape.is_fully_defined():
    return tf.reshape(t, shape)  # Free at run time.
  if shape.rank is not None:
    return tf.ensure_shape(t, shape)
  return t


def _gated(t: tf.Tensor, gate: tf.Tensor) -> tf.Tensor:
  """``t * gate``, skipping the multiplication when the gate is 1 (a DSNAS
  gate always is: it exists for its gradient)."""
  return tf.cond(tf.equal(gate, 1), lambda: tf.identity(t),
                 lambda: t * tf.cast(gate, t.dtype))


def call_switch(layer: keras.layers.Layer, x: tf.Tensor, index: tf.Tensor,
                training: bool, gate: tf.Tensor | None = None,
                recompute: bool = False) -> tf.Tensor:
  """Runs choice ``index`` of ``layer`` times ``gate`` (see the module
  docstring).

  Args:
    layer: a built layer with ``switch_branches()``: its choices in index
      order, each called as ``choice(x, training=training)``, all with the
      same output shape; every variable of ``layer`` belongs to one choice.
    x: the input tensor.
    index: int32 scalar tensor, the choice to run.
    training: Python bool.
    gate: optional float scalar tensor multiplying the output (the DSNAS
      "dummy 1"). Applied inside the functions, whose backward gets the
      gate's gradient ``sum(dy * y)`` from the kept tensors or the
      recomputed output: the step keeps no copy of the edge's output.
    recompute: recompute the chosen op in the backward call even where
      `saved_backward` could backpropagate from the tensors it keeps.

  Returns:
    The chosen op's output (times ``gate``). Its gradient reaches ``x``,
    ``gate`` and the chosen op's weights (the other weights get zeros); the
    chosen op's BatchNorm statistics are updated.
  """
  x = tf.convert_to_tensor(x)
  index = tf.cast(index, tf.int32)
  training = bool(training)
  variables = list(layer.variables)
  # One replica: the statistics go in as variables and only the chosen op
  # assigns them. Several: a mirrored assign must be made by the caller.
  assign_inside = not tf.distribute.has_strategy()
  # Kept tensors in training mode (see the module docstring).
  use_kept = training and not recompute
  key = (structure_key(layer), training, assign_inside, use_kept,
         tuple(x.shape), x.dtype)
  with _LOCK:
    cached = _FUNCTIONS.get(key)
    template = cached[0]() if cached is not None else None
    if template is None:
      template = layer
      cached = (weakref.ref(layer),
                *_make_functions(layer, training, assign_inside, use_kept))
      _FUNCTIONS[key] = cached
  _, forward, backward = cached
  trainable = [i for i, v in enumerate(variables) if v.trainable]
  stats = [i for i, v in enumerate(variables) if not v.trainable]
  if assign_inside:
    values = [current_value(v) if v.trainable else tf_variable(v)
              for v in variables]
    stats = []
  else:
    values = [current_value(v) for v in variables]
  keep = template  # Alive until the gradient has been traced.

  gated = gate is not None
  gate = tf.constant(1.0) if gate is None else tf.convert_to_tensor(gate)

  @tf.custom_gradient
  def run(x_in, gate_in, *weights):
    current = list(values)
    for i, w in zip(trainable, weights):
      current[i] = w
    with record.stop_recording():
      y, new_stats, kept = forward(x_in, index, current, gate_in)

    def grad(dy, *d_stats, variables=None):
      del d_stats  # Statistics are stop-gradient'ed in BatchNorm.
      assert keep is not None
      if variables:
        raise ValueError("a switched call read variables it was not given: "
                         f"{[v.name for v in variables]}")
      d_gate, *grads = backward(x_in, index, dy, current, gate_in, kept)
      return [grads[0], d_gate if gated else None, *grads[1:]]
    return (y, *new_stats), grad

  y, *new_stats = run(x, gate, *[values[i] for i in trainable])
  for i, value in zip(stats, new_stats):
    variables[i].assign(value)
  return y


def clear() -> None:
  """Forgets every switched function pair (later calls trace anew)."""
  with _LOCK:
    _FUNCTIONS.clear()


def branch_variables(layer: keras.layers.Layer) -> list[list]:
  """The variables of each choice of ``layer``, in choice order."""
  return [list(op.variables) for op in _branch_layers(layer)]
