"""DerivedCell: a fixed cell of an evaluation network, built from a genotype.

DARTS section 3.2 / SNAS section 3.2: after search, the derived cell is
stacked into a larger network and trained from scratch. Each edge of the
:class:`~tfnas.genotype.CellGenotype` becomes one op (affine BN); a node sums
its edges, and the cell output concatenates the nodes listed in ``concat``.

Nodes may have any number of incoming edges (an SNAS child graph drops
``none`` edges). A node with NO incoming edge outputs zeros of the node's
shape (``[B, H', W', C]``, ``H'`` the cell's output resolution), computed as
the ``none`` op of the cell's second input so that it stays a tensor of the
graph; concatenating it keeps the cell's channel count fixed.

Drop-path (FractalNet; the DARTS/SNAS evaluation code) zeroes the output of
an edge per example with probability ``drop_prob`` and rescales the kept ones
by ``1 / (1 - drop_prob)``; it is applied in training only and never to an
identity edge.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tfnas import ops
from tfnas.genotype import CellGenotype

_NUM_INPUTS = 2


def drop_path(x, drop_prob, seed):
  """Zeroes whole examples of ``x`` with probability ``drop_prob``.

  Args:
    x: ``[B, ...]`` tensor.
    drop_prob: scalar probability (tensor or float); 0 leaves ``x`` as is.
    seed: ``[2]`` int seed of the stateless random draw.

  Returns:
    ``x * mask / (1 - drop_prob)``, ``mask[b] ~ Bernoulli(1 - drop_prob)``.
  """
  keep = 1.0 - tf.cast(drop_prob, x.dtype)
  shape = tf.concat([tf.shape(x)[:1], tf.ones([tf.rank(x) - 1], tf.int32)], 0)
  mask = tf.floor(keep + tf.random.stateless_uniform(shape, seed,
                                                     dtype=x.dtype))
  return x / keep * mask


@keras.saving.register_keras_serializable(package="tfnas")
class DerivedCell(keras.layers.Layer):
  """One cell of an evaluation network (normal or reduction).

  ``call(s0, s1, drop_prob=0.0, seed=None, training=None)``: ``s0`` and
  ``s1`` are the outputs of the two previous cells, ``[B, H, W, C_pp]`` and
  ``[B, H', W', C_p]`` (``H = 2 H'`` when the previous cell reduced). Returns
  ``[B, H'/s, W'/s, len(concat) * channels]`` with ``s = 2`` for a reduction
  cell.

  Args:
    cell: the cell's genotype.
    prev_prev_channels, prev_channels: channels of ``s0`` and ``s1``.
    channels: channels C of every node.
    reduction: whether this cell halves the resolution (edges from the two
      inputs then have stride 2).
    reduction_prev: whether the previous cell did (``s0`` is then reduced by
      a FactorizedReduce).
    **kwargs: Forwarded to ``keras.layers.Layer``.
  """

  def __init__(self, cell: CellGenotype | dict, prev_prev_channels: int,
               prev_channels: int, channels: int, reduction: bool,
               reduction_prev: bool, **kwargs):
    super().__init__(**kwargs)
    if isinstance(cell, dict):  # From get_config.
      cell = CellGenotype(cell["nodes"], cell.get("concat"))
    cell.validate(ops.OPS, name="reduce" if reduction else "normal")
    self.cell = cell
    self.prev_prev_channels = prev_prev_channels
    self.prev_channels = prev_channels
    self.channels = channels
    self.reduction = reduction
    self.reduction_prev = reduction_prev
    if reduction_prev:
      self.preprocess0 = ops.FactorizedReduce(
          prev_prev_channels, channels, affine=True, name="preprocess0")
    else:
      self.preprocess0 = ops.ReLUConvBN(
          prev_prev_channels, channels, 1, 1, affine=True, name="preprocess0")
    self.preprocess1 = ops.ReLUConvBN(prev_channels, channels, 1, 1,
                                      affine=True, name="preprocess1")
    self.edge_ops = []
    self.edge_is_identity = []
    for node, op_name, source in cell.edges():
      stride = 2 if reduction and source < _NUM_INPUTS else 1
      op = ops.get_op(op_name, channels, stride, affine=True,
                      name=f"node{node}_{op_name}_from{source}")
      self.edge_ops.append(op)
      # Layers held only in a list are not tf.train.Checkpoint dependencies
      # (Keras' TrackedList is not a TF trackable): name each one.
      setattr(self, f"edge_{len(self.edge_ops) - 1}", op)
      self.edge_is_identity.append(isinstance(op, ops.Identity))
    # Output of an input-less node: zeros at the cell's output resolution.
    self.empty_node = ops.Zero(2 if reduction else 1, name="empty_node")

  @property
  def output_channels(self) -> int:
    return len(self.cell.concat) * self.channels

  def build(self, input_shape):
    self.built = True

  def call(self, s0, s1, drop_prob=0.0, seed=None, training=None):
    states = [self.preprocess0(s0, training=training),
              self.preprocess1(s1, training=training)]
    use_drop_path = bool(training) and seed is not None
    edges = self.cell.edges()
    e = 0
    for i, node_edges in enumerate(self.cell.nodes):
      total = None
      for _ in node_edges:
        _, _, source = edges[e]
        h = self.edge_ops[e](states[source], training=training)
        if use_drop_path and not self.edge_is_identity[e]:
          h = drop_path(h, drop_prob,
                        tf.random.experimental.stateless_fold_in(seed, e))
        total = h if total is None else total + h
        e += 1
      if total is None:
        total = self.empty_node(states[1])
      states.append(total)
    return tf.concat([states[c] for c in self.cell.concat], axis=-1)

  def get_config(self):
    config = super().get_config()
    config.update(cell=self.cell.to_dict(),
                  prev_prev_channels=self.prev_prev_channels,
                  prev_channels=self.prev_channels, channels=self.channels,
                  reduction=self.reduction, reduction_prev=self.reduction_prev)
    return config
