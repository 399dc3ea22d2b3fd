"""MixedOp: one edge of a supernet cell holding every candidate op."""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from tfnas import ops
from tfnas.layers.batch_norm import BatchNorm


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

  Pooling ops are followed by a non-affine BN, as in the DARTS search code.

  Input shape ``[B, H, W, C]``; output ``[B, H/s, W/s, C]``.
  """

  def __init__(self, channels: int, stride: int, candidates: Sequence[str],
               edge_ops: Sequence[str] | None = None, affine: bool = False,
               **kwargs):
    super().__init__(**kwargs)
    self.channels = channels
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

  def build(self, input_shape):
    self.built = True  # Sublayers build on first call (fast Keras 3 build).

  def call(self, inputs, weights=None, index=None, training=None):
    if index is not None:
      name = self.candidates[int(index)]
      if name not in self.ops:
        raise ValueError(f"op {name!r} is not offered on this edge "
                         f"(has {self.edge_ops})")
      out = self.ops[name](inputs, training=training)
      if weights is not None:
        out = out * tf.cast(weights[int(index)], out.dtype)
      return out
    if weights is None:
      raise ValueError("MixedOp needs weights (mixed mode) or an index")
    total = None
    for name, op in self.ops.items():
      if name == "none":
        continue
      w = tf.cast(weights[self.candidates.index(name)], inputs.dtype)
      term = w * op(inputs, training=training)
      total = term if total is None else total + term
    if total is None:  # Only `none` on this edge.
      total = self.ops["none"](inputs, training=training)
    return total

  def get_config(self):
    config = super().get_config()
    config.update(channels=self.channels, stride=self.stride,
                  candidates=list(self.candidates),
                  edge_ops=list(self.edge_ops), affine=self.affine)
    return config
