"""The DARTS cell search space and its supernet.

DARTS section 2.1 (and SNAS appendix G.1): a stem, ``num_cells`` cells with
reduction cells at 1/3 and 2/3 depth, global average pooling and a linear
classifier. Every cell of one type (normal / reduce) shares the same α row
set; the architecture sample is a call argument, never a network weight.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import keras
import tensorflow as tf

from tfnas import eager_cache, ops
from tfnas.arch import DecisionGroup
from tfnas.layers import recompute
from tfnas.layers.batch_norm import BatchNorm, synchronized_batch_norm
from tfnas.layers.cell import (Cell, cell_edges, one_pixel_cells_warning,
                               reduction_layers)
from tfnas.layers.initializers import conv_kernel, torch_dense

CELL_TYPES = ("normal", "reduce")
RECOMPUTE_UNITS = ("edge", "cell")

#: Candidate lists of the named spaces. ``darts`` is the DARTS/SNAS space;
#: s2–s4 are the RobustDARTS variants used by DARTS-PT (appendix A.2).
SPACE_CANDIDATES = {
    "darts": ops.DARTS_OPS,
    "s2": ("skip_connect", "sep_conv_3x3"),
    "s3": ("none", "skip_connect", "sep_conv_3x3"),
    "s4": ("sep_conv_3x3", "noise"),
}


@dataclasses.dataclass(frozen=True)
class DartsSpaceConfig:
  """Shape of a DARTS-space supernet.

  Attributes:
    candidates: candidate op names (columns of α).
    num_nodes: intermediate nodes per cell.
    num_cells: cells in the network.
    channels: initial channels C.
    stem_multiplier: the stem outputs ``stem_multiplier * C`` channels.
    num_classes: classifier outputs.
    edge_ops: optional per-cell-type, per-edge op lists (S1-style spaces);
      maps ``"normal"``/``"reduce"`` to a list of ``num_edges`` op lists.
    recompute: recompute activations in the backward pass instead of
      storing them (`recompute.recompute`): less peak memory, one more
      forward pass of the recomputed units.
    recompute_unit: what is recomputed as one unit: ``"edge"`` (each mixed
      edge; only node states and edge outputs are stored, backprop holds
      one edge's activations at a time) or ``"cell"`` (only cell inputs are
      stored, backprop holds a whole cell's activations).
    sync_batch_norm: batch statistics over all replicas (a multi-replica
      step then equals the single-device step on the global batch).
    shared_functions: trace each distinct edge structure once as a shared
      ``tf.function`` (see `MixedOp`); False traces every edge inline (much
      slower to trace, same results).
  """
  candidates: tuple[str, ...] = ops.DARTS_OPS
  num_nodes: int = 4
  num_cells: int = 8
  channels: int = 16
  stem_multiplier: int = 3
  num_classes: int = 10
  edge_ops: Mapping[str, tuple[tuple[str, ...], ...]] | None = None
  recompute: bool = False
  recompute_unit: str = "edge"
  sync_batch_norm: bool = False
  shared_functions: bool = True

  def __post_init__(self):
    if self.recompute_unit not in RECOMPUTE_UNITS:
      raise ValueError(f"unknown recompute_unit {self.recompute_unit!r}; "
                       f"choose from {RECOMPUTE_UNITS}")
    unknown = [op for op in self.candidates if op not in ops.OPS]
    if unknown:
      raise ValueError(f"unknown candidate op(s) {unknown}; known ops: "
                       f"{sorted(ops.OPS)}")
    if self.recompute and self.recompute_unit == "cell":
      randoms = [op for op in self.candidates if ops.has_random_output(op)]
      if randoms:
        raise ValueError(
            f"recompute_unit='cell' would run {randoms} again in backprop, "
            "drawing other samples than the forward pass used; recompute "
            "per edge (recompute_unit='edge') instead")
    for field in ("num_nodes", "num_cells", "channels", "num_classes"):
      if getattr(self, field) < 1:
        raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
    if self.edge_ops is not None:
      for cell_type, lists in self.edge_ops.items():
        if cell_type not in CELL_TYPES:
          raise ValueError(f"edge_ops key {cell_type!r} is not one of "
                           f"{CELL_TYPES}")
        if len(lists) != self.num_edges:
          raise ValueError(f"edge_ops[{cell_type!r}] has {len(lists)} edges, "
                           f"expected {self.num_edges}")
        for e, names in enumerate(lists):
          bad = [n for n in names if n not in self.candidates]
          if bad or not names:
            raise ValueError(f"edge_ops[{cell_type!r}][{e}] = {list(names)} "
                             f"must be a non-empty subset of {self.candidates}")

  @property
  def num_edges(self) -> int:
    return len(cell_edges(self.num_nodes))

  @property
  def reduction_layers(self) -> tuple[int, ...]:
    return reduction_layers(self.num_cells)

  def cell_types(self) -> list[str]:
    """Type of each cell, in order."""
    return ["reduce" if i in self.reduction_layers else "normal"
            for i in range(self.num_cells)]

  def warnings(self) -> list[str]:
    """Valid settings under which a search in this space learns less than it
    appears to: a missing cell type (fewer than 3 cells) whose α never gets
    a gradient, yet the genotype reports that cell."""
    present = set(self.cell_types())
    return [f"--num_cells={self.num_cells} has no {missing} cell (reduction "
            f"cells sit at 1/3 and 2/3 of the depth): its α gets no gradient, "
            f"and the genotype's {missing} cell is the argmax of its initial "
            f"α; search with 3 cells or more to search both"
            for missing in sorted({"normal", "reduce"} - present)]

  def input_warnings(self, image_size: int) -> list[str]:
    """`warnings` of this space on ``image_size``-pixel images: cells that
    see 1×1 feature maps, where the candidates hardly differ
    (`cell.one_pixel_cells_warning`)."""
    warning = one_pixel_cells_warning(self.num_cells, image_size)
    return [warning] if warning else []

  def ops_of(self, cell_type: str) -> tuple[tuple[str, ...], ...]:
    if self.edge_ops is not None and cell_type in self.edge_ops:
      return tuple(tuple(e) for e in self.edge_ops[cell_type])
    return (self.candidates,) * self.num_edges

  def decision_groups(self) -> list[DecisionGroup]:
    """One decision group per cell type present, for ArchParams."""
    # Both groups always exist (a 1-2 cell test network may lack one type);
    # an unused group simply receives zero gradients.
    groups = []
    for cell_type in CELL_TYPES:
      mask = None
      if self.edge_ops is not None and cell_type in self.edge_ops:
        mask = tuple(tuple(c in edge for c in self.candidates)
                     for edge in self.ops_of(cell_type))
      groups.append(DecisionGroup(cell_type, self.candidates, self.num_edges,
                                  mask))
    return groups


@keras.saving.register_keras_serializable(package="tfnas")
class SearchNetwork(keras.Model):
  """The DARTS-space supernet.

  ``call(images, arch_weights, arch_indices=None, training=None,
  dropout=None)``:
    images: ``[B, H, W, channels]`` float.
    arch_weights: mapping cell type → ``[num_edges, num_candidates]`` weights
      shared by every cell of that type, or ``[cells_of_type, num_edges,
      num_candidates]`` for a separate sample per cell.
    arch_indices: optional mapping cell type → per-edge Python ints (single
      path; only those ops are built into the traced graph), or per cell a
      sequence of such tuples, or an ``[num_edges]`` int tensor (switched
      single path: one traced graph serves every child, see `MixedOp`).
    dropout: unused (the search network has no dropout); accepted so that
      every supernet takes the same call.
  Returns ``[B, num_classes]`` logits.
  """

  def __init__(self, space: DartsSpaceConfig, **kwargs):
    super().__init__(**kwargs)
    self.space = space
    with synchronized_batch_norm(space.sync_batch_norm):
      self._create_layers(space)

  def _create_layers(self, space):
    c = space.channels
    stem_channels = space.stem_multiplier * c
    self.stem_conv = keras.layers.Conv2D(stem_channels, 3, padding="same",
                                         use_bias=False,
                                         kernel_initializer=conv_kernel(),
                                         name="stem_conv")
    self.stem_bn = BatchNorm(affine=True, name="stem_bn")
    c_pp, c_p, c_cur = stem_channels, stem_channels, c
    self.cells = []
    reduction_prev = False
    for i, cell_type in enumerate(space.cell_types()):
      reduction = cell_type == "reduce"
      if reduction:
        c_cur *= 2
      cell = Cell(space.num_nodes, c_pp, c_p, c_cur, reduction, reduction_prev,
                  space.candidates, space.ops_of(cell_type), affine=False,
                  shared_functions=space.shared_functions,
                  recompute_edges=(space.recompute and
                                   space.recompute_unit == "edge"),
                  name=f"cell_{i}_{cell_type}")
      self.cells.append(cell)
      # Keras 3 tracks the list for its own variable collection, but
      # tf.train.Checkpoint only follows attributes: name each cell.
      setattr(self, f"cell_{i}", cell)
      reduction_prev = reduction
      c_pp, c_p = c_p, space.num_nodes * c_cur
    self.pool = keras.layers.GlobalAveragePooling2D(name="global_pool")
    self.classifier = torch_dense(space.num_classes, c_p, name="classifier")

  def build(self, input_shape):
    self.built = True

  def call(self, images, arch_weights=None, arch_indices=None, training=None,
           dropout=None):
    del dropout  # No dropout in the search network.
    if arch_weights is None and arch_indices is None:
      arch_indices = self._only_architecture()
    s = self.stem_bn(self.stem_conv(images), training=training)
    s0 = s1 = s
    seen = {t: 0 for t in CELL_TYPES}
    per_cell = {}  # Per-cell weights: unstacked once (one op, not one per cell).
    switched = {}  # Tensor indices per cell type, unstacked once.
    for cell, cell_type in zip(self.cells, self.space.cell_types()):
      k = seen[cell_type]
      seen[cell_type] += 1
      weights = None
      if arch_weights is not None:
        weights = arch_weights[cell_type]
        if weights.shape.rank == 3:
          if cell_type not in per_cell:
            per_cell[cell_type] = tf.unstack(weights)
          weights = per_cell[cell_type][k]
      indices = None
      if arch_indices is not None and arch_indices.get(cell_type) is not None:
        indices = arch_indices[cell_type]
        if isinstance(indices, tf.Tensor):  # Switched single path: [E].
          if cell_type not in switched:
            switched[cell_type] = tf.unstack(indices)
          indices = switched[cell_type]
        elif indices and isinstance(indices[0], (tuple, list)):
          indices = indices[k]
      s0, s1 = s1, self._run_cell(cell, s0, s1, weights, indices, training)
    return self.classifier(self.pool(s1))

  def _only_architecture(self):
    """The indices of a network offering one op per edge (a derived child);
    any other network needs an architecture argument."""
    out = {}
    for cell_type in set(self.space.cell_types()):
      edges = self.space.ops_of(cell_type)
      if any(len(ops_) != 1 for ops_ in edges):
        raise ValueError(f"SearchNetwork needs arch_weights or arch_indices: "
                         f"its {cell_type} edges offer several ops")
      out[cell_type] = tuple(self.space.candidates.index(ops_[0])
                             for ops_ in edges)
    return out

  def _run_cell(self, cell, s0, s1, weights, indices, training):
    if (not self.space.recompute or self.space.recompute_unit != "cell" or
        not training or weights is None):
      return cell(s0, s1, weights=weights, indices=indices, training=training)
    # Recompute the cell's activations during backprop instead of storing
    # them: peak memory drops to roughly the cell boundaries plus one cell.
    # The variable values go in explicitly so that gradients also reach
    # values substituted by a StatelessScope (2nd-order DARTS).
    return recompute.recompute(
        lambda a, b, w: cell(a, b, weights=w, indices=indices,
                             training=training),
        [s0, s1, weights], cell.variables)

  def get_config(self):
    config = super().get_config()
    config.update(space=dataclasses.asdict(self.space))
    return config

  @classmethod
  def from_config(cls, config):
    space = config.pop("space")
    space["candidates"] = tuple(space["candidates"])
    return cls(DartsSpaceConfig(**space), **config)

  @property
  def weight_variables(self) -> list:
    """Trainable network weights (never α)."""
    return self.trainable_variables

  def choice_variables(self) -> list[tuple[Any, str, int, int]]:
    """``(variable, group, decision, candidate)`` for every trainable
    variable that belongs to one candidate op of one edge: a single-path
    child uses it only when that decision picks that candidate. Every
    other weight (stem, cell preprocessing, classifier) is used by every
    child: a ``none`` edge multiplies its input by zero, so gradients reach
    them (zeros through ``none``), as in the papers' code."""
    out = []
    for cell, cell_type in zip(self.cells, self.space.cell_types()):
      for e, mixed_op in enumerate(cell.mixed_ops):
        for name, op in mixed_op.ops.items():
          k = self.space.candidates.index(name)
          out.extend((v, cell_type, e, k) for v in op.trainable_variables)
    return out


def search_space(name: str, **overrides) -> DartsSpaceConfig:
  """A named space (``darts``, ``s2``, ``s3``, ``s4``) with field overrides."""
  if name not in SPACE_CANDIDATES:
    raise ValueError(f"unknown search space {name!r}; known spaces: "
                     f"{sorted(SPACE_CANDIDATES)}")
  return DartsSpaceConfig(candidates=SPACE_CANDIDATES[name], **overrides)


def build_search_network(space: DartsSpaceConfig, input_shape: Sequence[int],
                         arch_weights=None) -> SearchNetwork:
  """Builds the supernet and creates its variables with one eager call.

  Creating variables eagerly on a 1-image batch keeps variable creation out
  of ``tf.function`` tracing and is cheap (no symbolic Keras build).
  """
  net = SearchNetwork(space, name="supernet")
  if arch_weights is None:
    arch_weights = {g.name: tf.fill([g.num_decisions, len(g.candidates)],
                                    1.0 / len(g.candidates))
                    for g in space.decision_groups()}
  net(tf.zeros([1, *input_shape]), arch_weights, training=False)
  eager_cache.release_build_kernels()
  return net
