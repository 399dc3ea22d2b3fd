"""Cell: the DARTS-space search cell (2 inputs, N nodes, every edge mixed)."""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from tfnas import ops
from tfnas.layers import shared_function
from tfnas.layers.mixed_op import MixedOp


def cell_edges(num_nodes: int) -> list[tuple[int, int]]:
  """(node, input) pairs in edge order: node i+2 takes inputs 0..i+1."""
  return [(i + 2, j) for i in range(num_nodes) for j in range(i + 2)]


def reduction_layers(num_cells: int) -> tuple[int, ...]:
  """Indices of a network's reduction cells: at 1/3 and 2/3 of the depth
  (DARTS section 2.1)."""
  return tuple(sorted({num_cells // 3, 2 * num_cells // 3}))


def cell_input_sizes(num_cells: int, image_size: int) -> list[int]:
  """The side of each cell's input feature maps behind a stride-1 stem
  (the CIFAR networks) on ``image_size``-pixel images: each reduction cell
  halves it, rounding up."""
  reductions = reduction_layers(num_cells)
  sizes, size = [], image_size
  for i in range(num_cells):
    sizes.append(size)
    if i in reductions:
      size = -(-size // 2)
  return sizes


def one_pixel_cells_warning(num_cells: int, image_size: int) -> str | None:
  """What to say of cells that see 1×1 feature maps (stride-1 stem), where
  the k×k convolutions see only padding around their centre tap and the
  3×3 pools pass their input through; None when no cell does."""
  tiny = cell_input_sizes(num_cells, image_size).count(1)
  if not tiny:
    return None
  return (f"on {image_size}×{image_size} inputs {tiny} of its {num_cells} "
          f"cells {'gets' if tiny == 1 else 'get'} 1×1 feature maps, where "
          f"the convolutions and pools hardly differ; use larger inputs "
          f"(each reduction cell halves them)")


@keras.saving.register_keras_serializable(package="tfnas")
class Cell(keras.layers.Layer):
  """A search cell of the DARTS space (DARTS section 2.1, SNAS Fig. 1).

  Inputs are the outputs of the two previous cells ``(s0, s1)``; each is
  preprocessed to ``channels`` (FactorizedReduce on ``s0`` when the previous
  cell reduced). Node ``i`` sums its incoming edges; the output concatenates
  the ``num_nodes`` intermediate nodes, so it has ``num_nodes * channels``
  channels. In a reduction cell the edges leaving the two inputs have stride 2.

  Args:
    num_nodes: intermediate nodes N (DARTS: 4, giving 14 edges).
    prev_prev_channels, prev_channels: channels of s0 and s1.
    channels: channels C of every node.
    reduction: whether this cell halves the resolution.
    reduction_prev: whether the previous cell did.
    candidates: the space's candidate op names (columns of α).
    edge_ops: optional per-edge op lists (``len == num_edges``).
    affine: BN affine flag of the ops (False in the supernet).
    shared_functions: run edges through shared traced functions (see
      `MixedOp`); False traces every edge inline.
    recompute_edges: in training with mixing weights, recompute each edge's
      activations in backprop instead of storing them
      (`MixedOp.recomputed`).
  """

  def __init__(self, num_nodes: int, prev_prev_channels: int,
               prev_channels: int, channels: int, reduction: bool,
               reduction_prev: bool, candidates: Sequence[str],
               edge_ops: Sequence[Sequence[str]] | None = None,
               affine: bool = False, shared_functions: bool = True,
               recompute_edges: bool = False, **kwargs):
    super().__init__(**kwargs)
    self.recompute_edges = recompute_edges
    self.shared_functions = shared_functions
    self.num_nodes = num_nodes
    self.prev_prev_channels = prev_prev_channels
    self.prev_channels = prev_channels
    self.channels = channels
    self.reduction = reduction
    self.reduction_prev = reduction_prev
    self.candidates = tuple(candidates)
    self.edges = cell_edges(num_nodes)
    if edge_ops is None:
      edge_ops = [self.candidates] * len(self.edges)
    if len(edge_ops) != len(self.edges):
      raise ValueError(f"edge_ops has {len(edge_ops)} entries; a cell with "
                       f"{num_nodes} nodes has {len(self.edges)} edges")
    self.edge_ops = tuple(tuple(e) for e in edge_ops)
    self.affine = affine
    if reduction_prev:
      self.preprocess0 = ops.FactorizedReduce(
          prev_prev_channels, channels, affine=affine, name="preprocess0")
    else:
      self.preprocess0 = ops.ReLUConvBN(
          prev_prev_channels, channels, 1, 1, affine=affine, name="preprocess0")
    self.preprocess1 = ops.ReLUConvBN(
        prev_channels, channels, 1, 1, affine=affine, name="preprocess1")
    self.mixed_ops = [
        MixedOp(channels, 2 if reduction and j < 2 else 1, self.candidates,
                self.edge_ops[e], affine=affine,
                shared_functions=shared_functions, name=f"edge_{e}_{j}to{n}")
        for e, (n, j) in enumerate(self.edges)]
    for e, mixed_op in enumerate(self.mixed_ops):  # Checkpoint dependencies.
      setattr(self, f"edge_{e}", mixed_op)

  def build(self, input_shape):
    self.built = True

  def call(self, s0, s1, weights=None, indices=None, training=None):
    """Runs the cell.

    Args:
      s0, s1: ``[B, H, W, C_pp]`` and ``[B, H, W, C_p]`` inputs.
      weights: ``[num_edges, num_candidates]`` mixing weights, or the gates
        in single-path mode.
      indices: optional per-edge Python ints (single path: only these ops
        run), or scalar int tensors (switched single path, see `MixedOp`);
        ``None`` entries fall back to mixed mode for that edge.
      training: passed to every op.
    """
    states = [self._preprocess(self.preprocess0, s0, training),
              self._preprocess(self.preprocess1, s1, training)]
    # One op for all rows (eager single-path steps pay per op).
    rows = (None if weights is None else
            tf.unstack(weights) if isinstance(weights, tf.Tensor) else
            list(weights))
    for i in range(self.num_nodes):
      terms = []
      for e, (n, j) in enumerate(self.edges):
        if n != i + 2:
          continue
        index = None if indices is None else indices[e]
        w = None if rows is None else rows[e]
        terms.append(self._run_edge(self.mixed_ops[e], states[j], w, index,
                                    training))
      states.append(terms[0] if len(terms) == 1 else tf.add_n(terms))
    return tf.concat(states[2:], axis=-1)

  def _preprocess(self, layer, x, training):
    if not self.shared_functions:
      return layer(x, training=training)
    return shared_function.call_layer(layer, x, training)

  def _run_edge(self, mixed_op, x, w, index, training):
    if isinstance(index, tf.Tensor):  # Switched: recomputes or keeps.
      return mixed_op(x, weights=w, index=index, training=training,
                      recompute=self.recompute_edges)
    if not self.recompute_edges or not training or w is None:
      return mixed_op(x, weights=w, index=index, training=training)
    if (index is not None and self.shared_functions and
        shared_function.eager_outside_scopes()):
      # Eager single path: the shared call recomputes in its backward
      # function (two calls per edge, no tape inside the gradient).
      return mixed_op(x, weights=w, index=index, training=training,
                      recompute=True)
    # Keep only the edge input and weights; its ops run again in backprop.
    return mixed_op.recomputed(x, w, index, training)

  def get_config(self):
    config = super().get_config()
    config.update(num_nodes=self.num_nodes,
                  prev_prev_channels=self.prev_prev_channels,
                  prev_channels=self.prev_channels, channels=self.channels,
                  reduction=self.reduction, reduction_prev=self.reduction_prev,
                  candidates=list(self.candidates),
                  edge_ops=[list(e) for e in self.edge_ops],
                  affine=self.affine, shared_functions=self.shared_functions,
                  recompute_edges=self.recompute_edges)
    return config
