"""Gradient checkpointing for traced callers: recompute instead of store.

`recompute` drops a block's activations after the forward pass and
recomputes them during backprop, with the variable values passed explicitly
so that gradients also reach substituted values (``tf.recompute_grad`` would
silently miss tensors captured from an enclosing ``StatelessScope``, which
DARTS's 2nd order uses for its unrolled weights). Eager single-path callers
get the same saving from ``shared_function.call_shared(recompute=True)``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import keras
import tensorflow as tf
# The public API has no tape-wide "stop recording"; tf.recompute_grad uses
# this same internal.
from tensorflow.python.eager import record

from tfnas.layers.shared_function import current_value


def recompute(fn: Callable[..., Any], tensors: Sequence[tf.Tensor],
              variables: Sequence[keras.Variable]):
  """Runs ``fn(*tensors)`` keeping only its inputs for backprop.

  The activations inside ``fn`` are not stored; the gradient recomputes them
  (a second forward pass) and backpropagates through the recomputation.
  ``variables`` must cover every variable ``fn`` reads: their values are
  passed as explicit inputs, so their gradients come out as input gradients
  (to the variables, or to the tensors an enclosing ``StatelessScope``
  substitutes). Variables ``fn`` assigns (BN statistics) are assigned once,
  from the forward pass; the recomputation's assignments are dropped.

  Args:
    fn: ``(*tensors) -> tensor``.
    tensors: float tensor inputs of ``fn``.
    variables: the variables ``fn`` reads or assigns.

  Returns:
    ``fn``'s output.
  """
  variables = list(variables)
  tensors = [tf.convert_to_tensor(t) for t in tensors]
  values = [current_value(v) for v in variables]
  num = len(tensors)
  updated = []

  def forward(flat):
    with keras.StatelessScope(list(zip(variables, flat[num:]))) as scope:
      before = [scope.get_current_value(v) for v in variables]
      output = fn(*flat[:num])
      after = [scope.get_current_value(v) for v in variables]
    changed = [i for i, (b, a) in enumerate(zip(before, after)) if a is not b]
    return output, changed, [after[i] for i in changed]

  @tf.custom_gradient
  def run(*flat):
    # Not recorded on any tape: the custom gradient below replaces it, and
    # recording would only keep references to the activations.
    with record.stop_recording():
      output, changed, new_values = forward(list(flat))
    updated.extend(changed)

    def grad(d_output, *d_new_values):
      del d_new_values  # Statistics are stop-gradient'ed in BatchNorm.
      # Make the recomputation depend on the incoming gradient so it runs
      # in the backward pass, not eagerly next to the forward one (a data
      # dependency: XLA ignores control dependencies).
      dep = tf.reduce_sum(tf.reshape(d_output, [-1])[:1]) * 0.0
      inputs = [t + tf.cast(dep, t.dtype) for t in flat[:num]]
      inputs += [tf.identity(v) for v in flat[num:]]
      with tf.GradientTape() as tape:
        # Integer values (a noise op's seed) have no gradient to watch.
        tape.watch([t for t in inputs if t.dtype.is_floating])
        recomputed, _, _ = forward(inputs)
      return tape.gradient(recomputed, inputs, output_gradients=d_output,
                           unconnected_gradients=tf.UnconnectedGradients.ZERO)

    return (output, *new_values), grad

  output, *new_values = run(*tensors, *values)
  for i, value in zip(updated, new_values):
    variables[i].assign(value)
  return output
