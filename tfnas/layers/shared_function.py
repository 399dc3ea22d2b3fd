"""Trace-once execution of structurally identical layers.

Tracing a supernet is slow because Python builds every graph op of every
edge: the DARTS supernet has 112 edges but only a handful of distinct edge
*structures* (op list, channels, stride, input shape). `call_shared` runs a
layer as a ``tf.function`` shared by all layers of the same structure: the
function is traced once (with a "template" layer: the first one seen) and
takes the variable values as explicit arguments, so the calling graph holds
one call op per use, and TF derives one backward function per structure
(reused by every call site, also for higher-order gradients).

Variable values are substituted into the template with
``keras.StatelessScope``. Assignments made inside (the BatchNorm moving
statistics) are recorded by that scope instead of applied; the function
returns the new values and `call_shared` assigns them to the caller's
variables. Outside any scope that is a plain assign; inside an enclosing
``StatelessScope`` (DARTS 2nd order evaluates unrolled weights this way) it is
recorded there, exactly as the inline layer would behave.

Eager callers (single-path steps) pass the variables themselves, and the
function also assigns the statistics; ``call_shared(recompute=True)`` there
keeps no activations: its gradient is one call of a second shared function
that recomputes the forward pass and backpropagates.

Traced callers that want the same memory saving use `tfnas.layers.recompute`.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import weakref
from typing import Any, Callable, Sequence

import keras
import tensorflow as tf
# The public API has no tape-wide "stop recording"; tf.recompute_grad uses
# this same internal.
from tensorflow.python.eager import record

from tfnas.layers.batch_norm import BatchNorm

# fn(layer, static, *tensors) -> nest of tensors; select(layer, static) ->
# the variables fn reads. Both must be module-level (their identity is part of
# the cache key) and depend on the layer only through its structure.
Body = Callable[..., Any]
Selector = Callable[[keras.layers.Layer, tuple], Sequence[keras.Variable]]

_STRUCTURE_KEYS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


@dataclasses.dataclass
class _Entry:
  """One shared function: its template layer and traced ``tf.function``."""
  template: "weakref.ref"
  function: Any
  # Indices (into the selected variables) the body assigns; set when the
  # function is traced.
  updated: tuple[int, ...] | None = None
  # The recompute-and-backpropagate function (`call_shared(recompute=True)`).
  backward: Any = None


_FUNCTIONS: dict[tuple, _Entry] = {}


def structure_key(layer: keras.layers.Layer) -> tuple:
  """A hashable key equal for layers that compute the same function.

  Built from the class and config (minus the name) of the layer and all its
  sublayers, and the shape, dtype and trainability of its variables (in
  ``layer.variables`` order, which the shared function relies on).
  Computed once per layer: configs do not change after construction.
  """
  key = _STRUCTURE_KEYS.get(layer)
  if key is None:
    parts = []
    for sub in layer._flatten_layers(include_self=True, recursive=True):
      # A model's config repeats its layers' configs with their (unique,
      # hence differing) names; the layers themselves come next in the walk.
      config = {} if isinstance(sub, keras.Model) else dict(sub.get_config())
      config.pop("name", None)
      parts.append((type(sub).__module__, type(sub).__qualname__,
                    json.dumps(config, sort_keys=True, default=repr)))
    variables = tuple((tuple(v.shape), str(v.dtype), bool(v.trainable))
                      for v in layer.variables)
    key = (tuple(parts), variables)
    _STRUCTURE_KEYS[layer] = key
  return key


def current_value(variable) -> tf.Tensor:
  """The variable's value as a tensor, honouring an enclosing StatelessScope.

  ``Variable.value`` returns the substituted value inside a StatelessScope;
  it may also autocast (when called inside a mixed-precision layer), which is
  undone so the shared function sees values in the variable dtype.
  """
  value = tf.convert_to_tensor(variable.value)
  if value.dtype != variable.dtype:
    value = tf.cast(value, variable.dtype)
  return value


def eager_outside_scopes() -> bool:
  """Executing eagerly and outside any ``keras.StatelessScope``: where
  `call_shared` passes variables and honours ``recompute``."""
  return tf.executing_eagerly() and not _in_stateless_scope()


def _in_stateless_scope() -> bool:
  from keras.src.backend.common import stateless_scope  # No public API.
  return stateless_scope.in_stateless_scope()


def tf_variable(variable):
  """The tf.Variable behind a Keras variable when its dtype matches (so a
  function may read and assign it in place), else its current value."""
  value = getattr(variable, "value", variable)
  if isinstance(value, tf.Variable) and value.dtype == variable.dtype:
    return value
  return current_value(variable)


def _make_function(template, body: Body, select: Selector, static: tuple,
                   present: tuple[bool, ...], entry: _Entry):
  template_ref = weakref.ref(template)  # The cache must not keep nets alive.

  def run(tensors, values):
    layer = template_ref()
    variables = list(select(layer, static))
    it = iter(tensors)
    tensors = [next(it) if p else None for p in present]
    with keras.StatelessScope(list(zip(variables, values))) as scope:
      before = [scope.get_current_value(v) for v in variables]
      outputs = body(layer, static, *tensors)
      after = [scope.get_current_value(v) for v in variables]
    updated = tuple(i for i, (b, a) in enumerate(zip(before, after))
                    if a is not b)
    entry.updated = updated
    returned = []
    for i in updated:
      if isinstance(values[i], tf.Variable):
        # Eager callers pass variables: assigned here, in the same call,
        # instead of by one eager assign per updated variable.
        values[i].assign(after[i])
      else:
        returned.append(after[i])
    return outputs, returned

  def run_backward(tensors, values, output_grads):
    """Gradients of the body's outputs w.r.t. tensors and trainable values,
    recomputing the forward pass (its variable assignments are dropped)."""
    layer = template_ref()
    variables = list(select(layer, static))
    it = iter(tensors)
    full = [next(it) if p else None for p in present]
    trainable = [values[i] for i, v in enumerate(variables) if v.trainable]
    with tf.GradientTape() as tape:
      tape.watch(list(tensors) + trainable)
      with keras.StatelessScope(list(zip(variables, values))):
        outputs = body(layer, static, *full)
    return tape.gradient(outputs, list(tensors) + trainable,
                         output_gradients=output_grads,
                         unconnected_gradients=tf.UnconnectedGradients.ZERO)

  entry.backward = tf.function(run_backward, autograph=False)

  # autograph=False: bodies are plain Python over static structure; skipping
  # the AST conversion keeps tracing cheap.
  # The function stays inlinable: measured on the DARTS supernet, calls kept
  # as real function calls (``_noinline``) trace alike but step 2.6x slower
  # and need more memory (every intermediate the backward pass uses becomes
  # a function output).
  return tf.function(run, autograph=False)


def call_shared(layer: keras.layers.Layer, body: Body, select: Selector,
                tensors: Sequence[tf.Tensor | None], static: tuple = (),
                recompute: bool = False):
  """Runs ``body(layer, static, *tensors)`` as a function shared by structure.

  Args:
    layer: a built layer (all variables created).
    body: module-level function ``(layer, static, *tensors) -> outputs``;
      may assign variables of ``select(layer, static)`` (BN statistics).
    select: module-level function giving the variables ``body`` reads, in an
      order that is the same for every layer of one structure.
    tensors: tensor arguments; ``None`` entries are passed through as None.
    static: hashable Python values ``body`` depends on (index, training).
    recompute: in an eager call, keep no activations for backprop: the
      gradient is one call of a shared function that recomputes the forward
      pass and backpropagates through it (`_recomputed_call`). Ignored in
      graphs and inside a ``StatelessScope`` (use `recompute` there).

  Returns:
    ``body``'s outputs. Variables it assigned are assigned on ``layer``.
  """
  present = tuple(t is not None for t in tensors)
  args = [tf.convert_to_tensor(t) for t in tensors if t is not None]
  variables = list(select(layer, static))
  key = (structure_key(layer), body, select, static, present,
         tuple((tuple(a.shape), a.dtype) for a in args))
  with _LOCK:
    entry = _FUNCTIONS.get(key)
    # A strong reference for this call: the template (another network's
    # layer, possibly) must outlive any tracing this call triggers.
    template = entry.template() if entry is not None else None
    if template is None:
      entry = _Entry(weakref.ref(layer), None)
      entry.function = _make_function(layer, body, select, static, present,
                                      entry)
      _FUNCTIONS[key] = entry
      template = layer
  eager = eager_outside_scopes()
  if eager and recompute:
    return _recomputed_call(entry, template, args, variables)
  if eager:
    # An eager call (single-path steps) passes the variables themselves:
    # they are read inside the function instead of by one eager op per
    # variable per call. Traced callers keep reading values in their graph.
    values = [_eager_argument(v, read=False) for v in variables]
  else:
    values = [current_value(v) for v in variables]
  outputs, new_values = entry.function(args, values)
  _assign_returned(entry, variables, values, new_values)
  return outputs


def _eager_argument(variable, read: bool):
  """What an eager `call_shared` passes for ``variable``: its value if
  ``read``, else the variable itself, so that the function reads it and
  assigns it in place.

  Under a tf.distribute strategy every variable goes in as its value, read
  in the caller's replica context: a function traced once for all replicas
  must not bind one replica's copy of a mirrored variable, and a mirrored
  assign synchronises replicas (``merge_call``), which cannot run inside a
  function; the caller assigns the returned statistics instead."""
  if read or tf.distribute.has_strategy():
    return current_value(variable)
  return tf_variable(variable)


def _assign_returned(entry, variables, values, new_values):
  """Assigns the new values a shared function returned (not assigned
  inside because their variable came in as a value)."""
  targets = [i for i in entry.updated
             if not isinstance(values[i], tf.Variable)]
  for i, value in zip(targets, new_values):
    variables[i].assign(value)


def _recomputed_call(entry, template, args, variables):
  """Eager `call_shared` whose activations are recomputed in backprop.

  Forward: the shared function runs unrecorded (its intermediates are freed
  at once). Backward: one call of ``entry.backward`` recomputes the forward
  pass and returns the gradients of the inputs and trainable values, so an
  edge costs two function calls, as without recomputation. Trainable
  variables are read here (recorded, so their gradients reach them); BN
  statistics go in as variables and are assigned once, by the forward call.
  """
  values = [_eager_argument(v, read=v.trainable) for v in variables]
  trainable = [i for i, v in enumerate(variables) if v.trainable]
  num = len(args)
  template_alive = template

  @tf.custom_gradient
  def run(*flat):
    inputs = list(flat[:num])
    current = list(values)
    for i, value in zip(trainable, flat[num:]):
      current[i] = value
    with record.stop_recording():
      outputs, new_values = entry.function(inputs, current)
    _assign_returned(entry, variables, current, new_values)

    def grad(*output_grads, variables=None):
      # Referencing the template keeps ``entry.backward`` traceable until
      # the gradient runs, even if the template's network is gone by then.
      assert template_alive is not None
      if variables:
        raise ValueError("recomputed shared call read variables it was not "
                         f"given: {[v.name for v in variables]}")
      grads = entry.backward(inputs, current, list(output_grads))
      return grads
    return outputs, grad

  return run(*args, *[values[i] for i in trainable])


def _layer_body(layer, static, inputs):
  """Body of `call_layer`: the layer's own call."""
  (training,) = static
  return layer(inputs, training=training)


def _layer_variables(layer, static):
  del static
  return layer.variables


def shareable(layers: Sequence[keras.layers.Layer], training) -> bool:
  """Whether calls of ``layers`` may go through shared functions.

  Variables are created by the first (inline) call, so every sublayer must
  be built: a shared function must never create variables (it would create
  them on its template). ``training`` must be a Python value. A synchronized
  BN all-reduces through ``merge_call``, which cannot reach into a function
  traced separately per replica: such layers stay inline under several
  replicas.
  """
  if isinstance(training, tf.Tensor):
    return False
  subs = [sub for layer in layers for sub in layer._flatten_layers()]
  if not all(sub.built for sub in subs):
    return False
  ctx = tf.distribute.get_replica_context()
  if ctx is not None and ctx.num_replicas_in_sync > 1:
    return not any(isinstance(sub, BatchNorm) and sub.synchronized
                   for sub in subs)
  return True


def call_layer(layer: keras.layers.Layer, inputs, training):
  """``layer(inputs, training=training)`` through a shared function when
  `shareable`, else inline."""
  if not shareable([layer], training):
    return layer(inputs, training=training)
  return call_shared(layer, _layer_body, _layer_variables, (inputs,),
                     (bool(training),))


def num_shared_functions(body: Body | None = None) -> int:
  """How many shared functions exist (of ``body``, if given; for tests and
  benchmarks)."""
  if body is None:
    return len(_FUNCTIONS)
  return sum(1 for key in _FUNCTIONS if key[1] is body)


def clear() -> None:
  """Forgets every shared function (later calls trace anew)."""
  with _LOCK:
    _FUNCTIONS.clear()
