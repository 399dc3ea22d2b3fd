"""MixedOp: one edge of a supernet cell holding every candidate op."""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from tfnas import ops
from tfnas.layers import recompute, shared_function, switch_path
from tfnas.layers.batch_norm import BatchNorm


def _mixed_op_body(layer, static, inputs, weights):
  """The shared-function body: the inline forward of a MixedOp."""
  index, training, exclude = static
  return layer._forward(inputs, weights, index, training, exclude)


def _mixed_op_variables(layer, static):
  """Variables read by `_mixed_op_body`: the chosen op's, or all run."""
  index, _, exclude = static
  if index is None:
    return [v for name, op in layer.ops.items() if name not in exclude
            for v in op.variables]
  return layer.ops[layer.candidates[index]].variables


@keras.saving.register_keras_serializable(package="tfnas")
class MixedOp(keras.layers.Layer):
  """A supernet edge: weighted sum of candidate ops, or one chosen op.

  DARTS section 2.2 / SNAS eq. (1): ``m(x) = Σ_k w_k · o_k(x)``. The weights
  row covers the *space's* full candidate list (``candidates``); this edge
  builds only the ops in ``edge_ops`` (S1-style spaces offer different ops per
  edge), so weights of ops it lacks must be zero.

  Two modes, chosen per call:
    * mixed (``index=None``): every op with non-zero support runs. ``none``
      contributes exactly zero and is skipped (its α gradient is zero anyway).
    * single path (``index`` a Python int into ``candidates``): only that op
      runs and is traced; if ``weights`` is given its entry acts as a gate
      (DSNAS's "dummy 1": value 1, gradient ∂L/∂gate).
    * switched single path (``index`` an int tensor, in a traced step): one
      graph serves every choice; only the chosen op executes
      (`switch_path.call_switch`); backprop reads the tensors its forward
      pass kept, or recomputes it (``recompute``).

  Pooling ops are followed by a non-affine BN, as in the DARTS search code.

  Once built, a call runs as a ``tf.function`` shared by every MixedOp of the
  same structure and input shape (`shared_function.call_shared`): traced once,
  with the variable values passed in, so tracing a supernet costs one edge
  per distinct edge structure instead of one per edge. Results, gradients
  (of any order) and BN statistic updates equal the inline computation.

  Input shape ``[B, H, W, C]``; output ``[B, H/s, W/s, C]``.

  Args:
    channels: input and output channels.
    stride: 1, or 2 on reduction edges.
    candidates: the space's candidate op names (columns of the weights).
    edge_ops: the ops this edge offers (default: all candidates).
    affine: BN affine flag of the ops.
    shared_functions: run through shared traced functions (else inline).
    **kwargs: forwarded to ``keras.layers.Layer``.
  """

  def __init__(self, channels: int, stride: int, candidates: Sequence[str],
               edge_ops: Sequence[str] | None = None, affine: bool = False,
               shared_functions: bool = True, **kwargs):
    super().__init__(**kwargs)
    self.channels = channels
    self.shared_functions = shared_functions
    self.stride = stride
    self.candidates = tuple(candidates)
    self.edge_ops = tuple(edge_ops) if edge_ops is not None else self.candidates
    self.affine = affine
    unknown = [op for op in self.edge_ops if op not in self.candidates]
    if unknown:
      raise ValueError(f"edge ops {unknown} are not among the space's "
                       f"candidates {self.candidates}")
    self.ops = {}
    for op_name in self.edge_ops:
      op = ops.get_op(op_name, channels, stride, affine=affine, name=op_name)
      if "pool" in op_name:
        op = keras.Sequential([op, BatchNorm(affine=False, name="bn")],
                              name=op_name)
      self.ops[op_name] = op
      setattr(self, f"op_{op_name}", op)  # A checkpoint dependency.

  def build(self, input_shape):
    self.built = True  # Sublayers build on first call (fast Keras 3 build).

  def call(self, inputs, weights=None, index=None, training=None,
           recompute=False, exclude=()):
    """See the class docstring; ``recompute``: recompute the op in
    backprop (eager shared calls: `call_shared`'s; switched calls:
    `call_switch`'s, which otherwise backpropagate from kept tensors). An
    op with a random output (`random_ops`) is never recomputed: a second
    run would draw another sample than the forward pass used.
    ``exclude``: mixed mode only, op names left out of the sum."""
    exclude = tuple(sorted(exclude))
    if exclude and index is not None:
      raise ValueError("exclude applies to mixed mode (no index)")
    if isinstance(index, tf.Tensor):
      return self._switched(inputs, weights, index, training, recompute)
    if index is not None:
      index = int(index)
      name = self.candidates[index]
      if name not in self.ops:
        raise ValueError(f"op {name!r} is not offered on this edge "
                         f"(has {self.edge_ops})")
      recompute = recompute and name not in self.random_ops()
    elif weights is None:
      raise ValueError("MixedOp needs weights (mixed mode) or an index")
    else:
      unknown = [name for name in exclude if name not in self.ops]
      if unknown or all(name in exclude for name in self.ops):
        raise ValueError(f"exclude={list(exclude)} must name some, not all, "
                         f"of this edge's ops {list(self.edge_ops)}")
      # Recomputing a random op would draw another sample: a caller
      # wanting recomputation excludes them and adds `sum_of` them.
      recompute = recompute and not any(name not in exclude
                                        for name in self.random_ops())
    if self._can_share(index, training, exclude):
      return shared_function.call_shared(
          self, _mixed_op_body, _mixed_op_variables, (inputs, weights),
          (index, bool(training), exclude), recompute=recompute)
    return self._forward(inputs, weights, index, training, exclude)

  def sum_of(self, inputs, weights, names, training) -> tf.Tensor:
    """``Σ_k w_k · o_k(x)`` over the ops ``names`` only, run inline."""
    total = None
    for name in names:
      w = tf.cast(weights[self.candidates.index(name)], inputs.dtype)
      term = w * self.ops[name](inputs, training=training)
      total = term if total is None else total + term
    return total

  def random_ops(self) -> tuple[str, ...]:
    """This edge's ops whose output is drawn anew on every call
    (``random_output``, e.g. `noise`): backprop must use the forward
    pass's sample, so recomputation leaves them out."""
    return tuple(name for name, op in self.ops.items() if ops.draws_anew(op))

  def recomputed(self, inputs, weights, index, training) -> tf.Tensor:
    """The call with only ``inputs`` and ``weights`` kept: the ops run
    again in backprop (`recompute.recompute`, for traced callers). Ops
    drawing a new sample on every call (`random_ops`) run outside the
    recomputation, stored: backprop must read the sample the loss saw."""
    randoms = self.random_ops()
    if index is not None:
      if self.candidates[int(index)] in randoms:
        return self(inputs, weights=weights, index=index, training=training)
      randoms = ()
    elif randoms and all(name == "none" or name in randoms
                         for name in self.edge_ops):
      return self(inputs, weights=weights, training=training)
    out = recompute.recompute(
        lambda a, b: self(a, weights=b, index=index, training=training,
                          exclude=randoms),
        [inputs, weights], self.variables)
    if randoms:
      out += self.sum_of(inputs, weights, randoms, training)
    return out

  def switch_branches(self) -> list[keras.layers.Layer]:
    """This edge's ops in ``edge_ops`` order (`switch_path`)."""
    return [self.ops[name] for name in self.edge_ops]

  def _switched(self, inputs, weights, index, training, recompute):
    """The op ``index`` (a tensor into ``candidates``) run by
    `switch_path.call_switch`; ``weights[index]`` gates it."""
    # As in mixed mode, `none` (no weights) may still be unbuilt.
    if not self._can_share(None, training):
      raise ValueError(f"{self.name}: a tensor index needs built ops, a "
                       "Python `training` and shared functions")
    # Candidate index -> position in edge_ops (-1: not offered here).
    table = tf.constant([self.edge_ops.index(c) if c in self.edge_ops else -1
                         for c in self.candidates], tf.int32)
    position = tf.gather(table, index)
    if len(self.edge_ops) < len(self.candidates):
      tf.debugging.assert_non_negative(
          position, message=f"{self.name}: sampled an op it does not offer")
    gate = None if weights is None else tf.gather(weights, index)
    return switch_path.call_switch(self, inputs, position, training, gate,
                                   recompute=recompute)

  def _can_share(self, index, training, exclude=()) -> bool:
    """Whether this call may go through a shared function."""
    if not self.shared_functions:
      return False
    if index is not None:
      used = [self.ops[self.candidates[index]]]
    else:  # Mixed mode skips `none` (see _forward).
      used = [op for name, op in self.ops.items()
              if name != "none" and name not in exclude]
    return shared_function.shareable(used, training)

  def _forward(self, inputs, weights, index, training, exclude=()):
    """The inline computation (also the body of the shared function)."""
    if index is not None:
      name = self.candidates[index]
      out = self.ops[name](inputs, training=training)
      if weights is not None:
        out = out * tf.cast(weights[index], out.dtype)
      return out
    names = [name for name in self.ops
             if name != "none" and name not in exclude]
    if not names:  # Only `none` on this edge.
      return self.ops["none"](inputs, training=training)
    return self.sum_of(inputs, weights, names, training)

  def get_config(self):
    config = super().get_config()
    config.update(channels=self.channels, stride=self.stride,
                  candidates=list(self.candidates),
                  edge_ops=list(self.edge_ops), affine=self.affine,
                  shared_functions=self.shared_functions)
    return config
