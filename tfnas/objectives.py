"""Objectives beyond the data loss: the locally decomposable resource cost.

SNAS section 2.4 (eqs. 9-11) and appendix F: the cost of a child network is
linear in the one-hot decisions, ``C(Z) = Σ_edges Z_eᵀ C(O_e)``, with local
per-edge, per-op costs (parameter size, FLOPs, memory access cost) computed
analytically from the op type, channels, stride and feature-map size.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf

from tfnas.errors import TfnasError
from tfnas.layers.cell import cell_edges

METRICS = ("params", "flops", "mac", "all")
RESOURCE_GRADIENTS = ("policy", "reparam", "exact")


def edge_cost_tables(space, image_size: int) -> dict[str, np.ndarray]:
  """Per cell type, a ``[cells_of_type, E, K, 3]`` table of (params, FLOPs,
  MAC) of every candidate on every edge of every cell of the supernet.

  Args:
    space: a ``DartsSpaceConfig``.
    image_size: input height = width (the stem keeps the resolution).
  """
  from tfnas import cost as cost_lib  # The analytic per-op costs.
  tables = {"normal": [], "reduce": []}
  size = image_size
  channels = space.channels
  for cell_type in space.cell_types():
    reduction = cell_type == "reduce"
    if reduction:
      channels *= 2
    edge_ops = space.ops_of(cell_type)
    out_size = (size + 1) // 2 if reduction else size
    table = np.zeros((space.num_edges, len(space.candidates), 3))
    for e, (node, j) in enumerate(cell_edges(space.num_nodes)):
      stride = 2 if reduction and j < 2 else 1
      in_size = size if stride == 2 else out_size
      for k, op in enumerate(space.candidates):
        if op not in edge_ops[e]:
          continue
        c = cost_lib.op_cost(op, channels, stride, (in_size, in_size))
        table[e, k] = (c.params, c.flops, c.mac)
    tables[cell_type].append(table)
    size = out_size
  return {k: np.stack(v) for k, v in tables.items() if v}


def combine_metric(tables: Mapping[str, np.ndarray], metric: str
                   ) -> dict[str, np.ndarray]:
  """Reduces (params, FLOPs, MAC) to one normalised cost per candidate.

  Each metric is divided by its value for the most expensive child (the sum
  over all edges of the costliest candidate), so ``C(Z)`` of any child lies
  in [0, 1] and η reads as "loss units per whole-network cost". ``all``
  averages the three normalised metrics: appendix F shows all three are
  needed to tell conv, pool, skip and none apart.
  """
  if metric not in METRICS:
    raise TfnasError(f"unknown resource metric {metric!r}; choose from "
                     f"{METRICS}")
  peak = sum(t.max(axis=2).sum(axis=(0, 1)) for t in tables.values())
  peak = np.where(peak > 0, peak, 1.0)
  out = {}
  for name, t in tables.items():
    normalised = t / peak
    if metric == "all":
      out[name] = normalised.mean(axis=-1)
    else:
      out[name] = normalised[..., METRICS.index(metric)]
  return out


@dataclasses.dataclass
class ResourceConstraint:
  """η · C(Z) with a chosen gradient estimator for α.

  Attributes:
    costs: group → ``[cells_of_type, E, K]`` normalised local costs.
    weight: η.
    gradient: ``policy`` (score function, SNAS eq. 11: per edge
      ``∇α log p(Z_e) · [Z_eᵀ C_e]_c``), ``reparam`` (gradient through the
      relaxed sample) or ``exact`` (``Σ_e softmax(α_e)ᵀ C_e``, the
      expectation under the discrete distribution).
  """
  costs: Mapping[str, np.ndarray]
  weight: float
  gradient: str = "policy"

  def __post_init__(self):
    if self.gradient not in RESOURCE_GRADIENTS:
      raise TfnasError(f"unknown --resource_gradient={self.gradient!r}; "
                       f"choose from {RESOURCE_GRADIENTS}")

  def _per_edge_cost(self, name, z):
    """Local costs Z_eᵀ C_e: ``[E]`` (summed over the cells sharing Z) or,
    for one sample per cell (``z`` of rank 3), ``[cells, E]``."""
    table = tf.constant(self.costs[name], z.dtype)  # [cells, E, K]
    if z.shape.rank == 3:
      return tf.reduce_sum(z * table, axis=2)
    return tf.reduce_sum(z[None] * table, axis=[0, 2])

  def cost(self, z_by_group: Mapping[str, tf.Tensor]) -> tf.Tensor:
    """C(Z): total normalised cost of the sampled child."""
    return tf.add_n([tf.reduce_sum(self._per_edge_cost(n, z))
                     for n, z in z_by_group.items() if n in self.costs])

  def surrogate(self, arch, sample, log_sample, distribution, step):
    """A scalar whose α-gradient is the chosen estimate of ∇α η E[C(Z)]."""
    terms = []
    for name, z in sample.items():
      if name not in self.costs:
        continue
      if self.gradient == "reparam":
        terms.append(tf.reduce_sum(self._per_edge_cost(name, z)))
      elif self.gradient == "exact":
        p = arch.probabilities(name)
        if z.shape.rank == 3:
          p = tf.broadcast_to(p, tf.shape(z))
        terms.append(tf.reduce_sum(self._per_edge_cost(name, p)))
      else:
        local = tf.stop_gradient(self._per_edge_cost(name, z))
        log_p = distribution.log_prob(arch, name, tf.stop_gradient(
            log_sample[name]), step)
        terms.append(tf.reduce_sum(log_p * local))
    return tf.cast(self.weight, terms[0].dtype) * tf.add_n(terms)


@dataclasses.dataclass(frozen=True)
class DecisionFlops:
  """A child's analytic FLOPs as a sum over its decisions.

  ``fixed + Σ_g Σ_e tables[g][e, Z_e]`` equals the FLOPs
  `tfnas.child.child_cost` reports for the child Z: multiply-adds per image
  of the whole network, a cell space's pooling edges counted as H·W·9·C
  unless built with ``count_pooling=False`` (``fixed``: stem, head conv and
  classifier of a block space; stem, every cell's two preprocessing convs
  and classifier of a cell space).

  Attributes:
    tables: group → ``[E, K]`` FLOPs of each candidate of each decision; a
      decision shared by several cells (the DARTS cell space samples once
      per cell type) costs the sum over those cells.
    fixed: FLOPs every child has.
  """
  tables: Mapping[str, np.ndarray]
  fixed: float

  @property
  def scale(self) -> float:
    """Decision FLOPs of the costliest child (the normalising constant)."""
    return float(sum(t.max(axis=-1).sum() for t in self.tables.values()))

  def normalised_tables(self) -> dict[str, np.ndarray]:
    """``tables / scale``: the costliest child's decisions sum to 1."""
    scale = self.scale
    if scale <= 0:
      raise TfnasError("the space's candidates have no FLOPs; a FLOPs "
                       "penalty is meaningless")
    return {g: (t / scale).astype(np.float32) for g, t in self.tables.items()}

  def child(self, indices: Mapping[str, Sequence[int]]) -> float:
    """FLOPs of the child taking candidate ``indices[g][e]`` at every
    decision."""
    return self.fixed + sum(
        float(t[np.arange(len(t)), np.asarray(indices[g], int)].sum())
        for g, t in self.tables.items())

  def normalise(self, flops: float) -> float:
    """A child's FLOPs on the scale of `normalised_tables`."""
    return (flops - self.fixed) / self.scale

  def extreme_child(self, cheapest: bool,
                    masks: Mapping[str, np.ndarray] | None = None) -> float:
    """FLOPs of the cheapest (or costliest) child, choosing only among each
    decision's offered candidates (``masks``: group → ``[E, K]`` bools)."""
    total = self.fixed
    for g, t in self.tables.items():
      offered = t.astype(np.float64)
      if masks is not None and g in masks:
        offered = np.where(masks[g], offered, np.inf if cheapest else -np.inf)
      pick = offered.min if cheapest else offered.max
      total += float(pick(axis=-1).sum())
    return total


def decision_flops(space, image_size: int, in_channels: int = 3,
                   count_pooling: bool = True) -> DecisionFlops:
  """The `DecisionFlops` of a cell space (`edge_cost_tables`, and
  `tfnas.cost.cell_network_fixed_cost` for the stem, preprocessing convs
  and classifier) or block space (`shufflenet.block_costs`,
  `shufflenet.network_flops`) for images of ``image_size`` with
  ``in_channels`` channels.

  ``count_pooling=False``: candidates without weights (pooling, skip,
  none) cost nothing, as in the multiply-adds of `tfnas.cost.network_cost`
  (by default a pooling edge counts H·W·9·C, SNAS appendix F). Block
  spaces have no such candidates.
  """
  from tfnas.spaces import shufflenet  # Only for block spaces.
  if isinstance(space, shufflenet.ShuffleNetSpaceConfig):
    table = shufflenet.block_costs(space, image_size)[..., 1]
    first = shufflenet.network_flops(space, [0] * space.num_blocks,
                                     image_size, in_channels)
    return DecisionFlops({shufflenet.GROUP: table},
                         float(first - table[:, 0].sum()))
  from tfnas import cost as cost_lib  # The analytic network layout.
  fixed = cost_lib.cell_network_fixed_cost(
      space.num_cells, space.num_nodes, space.channels,
      (image_size, image_size, in_channels), space.num_classes,
      space.stem_multiplier)
  tables = {}
  for g, t in edge_cost_tables(space, image_size).items():
    flops = t[..., 1] if count_pooling else np.where(t[..., 0] > 0,
                                                      t[..., 1], 0.0)
    tables[g] = flops.sum(axis=0)
  return DecisionFlops(tables, float(fixed.madds))
