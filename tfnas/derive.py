"""Deriving cell genotypes from architecture parameters α.

* :func:`derive_darts` -- the DARTS magnitude rule (strongest non-``none`` op
  per edge, top-k edges per node).
* :func:`derive_argmax` -- the SNAS child-graph rule (argmax per edge
  including ``none``; ``none`` edges are dropped).

α of a cell is ``[num_edges(N), num_ops]`` with rows in ``edge_index(N)``
order. Like ``tfnas.genotype``, pure Python plus numpy (no TensorFlow).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from tfnas.genotype import (NONE_OP, NUM_INPUTS, SAME_AS_NORMAL, CellGenotype,
                            Genotype, GenotypeError, check_num_nodes,
                            node_offsets, num_edges)

__all__ = ["derive_darts", "derive_argmax"]


def _check_op_names(op_names: Sequence[str]) -> list[str]:
  if isinstance(op_names, str):
    raise GenotypeError(f"op_names must be a sequence of op names, got the "
                        f"string {op_names!r}")
  names = list(op_names)
  if not names:
    raise GenotypeError("op_names is empty; pass the candidate op names "
                        "(columns of alpha)")
  for n in names:
    if not isinstance(n, str) or not n:
      raise GenotypeError(f"op_names entry {n!r} is not a non-empty string")
  if len(set(names)) != len(names):
    dup = sorted({n for n in names if names.count(n) > 1})
    raise GenotypeError(f"op_names repeats {dup}; each candidate must appear "
                        f"once")
  return names


def _masked_softmax(alpha: Any, mask: Any, num_nodes: int, num_ops: int,
                    what: str) -> tuple[np.ndarray, np.ndarray]:
  """Softmax over allowed candidates per edge.

  Returns:
    ``(weights, allowed)``, both ``[E, K]``; disallowed entries have weight 0.
  """
  expected = (num_edges(num_nodes), num_ops)
  try:
    a = np.asarray(alpha, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise GenotypeError(f"{what}: cannot convert to a float array ({e})"
                        ) from None
  if a.shape != expected:
    raise GenotypeError(
        f"{what} has shape {a.shape}, expected {expected} "
        f"({expected[0]} edges for num_nodes={num_nodes} x {num_ops} "
        f"op_names)")
  if not np.all(np.isfinite(a)):
    raise GenotypeError(f"{what} contains non-finite values (NaN or inf); "
                        f"the search likely diverged")
  if mask is None:
    allowed = np.ones(expected, dtype=bool)
  else:
    allowed = np.asarray(mask)
    mask_name = "candidate_mask" if what == "alpha_normal" else "reduce_mask"
    if allowed.shape != expected:
      raise GenotypeError(f"{mask_name} for {what} has shape {allowed.shape}, "
                          f"expected {expected}")
    allowed = allowed.astype(bool)
    empty = np.flatnonzero(~allowed.any(axis=1))
    if empty.size:
      raise GenotypeError(f"{mask_name} for {what}: edge {int(empty[0])} "
                          f"allows no candidate op; allow at least one per "
                          f"edge")
  logits = np.where(allowed, a, -np.inf)
  logits = logits - logits.max(axis=1, keepdims=True)
  w = np.exp(logits)  # exp(-inf) == 0 for disallowed ops.
  w = w / w.sum(axis=1, keepdims=True)
  return w, allowed


def _resolve_masks(candidate_mask: Any, reduce_mask: Any) -> tuple[Any, Any]:
  if reduce_mask is SAME_AS_NORMAL:
    reduce_mask = candidate_mask
  return candidate_mask, reduce_mask


def _darts_cell(alpha: Any, mask: Any, names: list[str], num_nodes: int,
                edges_per_node: int, what: str) -> CellGenotype:
  w, allowed = _masked_softmax(alpha, mask, num_nodes, len(names), what)
  selectable = allowed.copy()
  if NONE_OP in names:
    selectable[:, names.index(NONE_OP)] = False
  scores = np.where(selectable, w, -np.inf)
  best = scores.argmax(axis=1)  # Ties → lower op index.
  strength = scores.max(axis=1)  # -inf where no non-none op is allowed.
  nodes = []
  for i, offset in enumerate(node_offsets(num_nodes)):
    inputs = [j for j in range(i + NUM_INPUTS)
              if np.isfinite(strength[offset + j])]
    # Stable sort: equal strengths keep the lower input index first.
    inputs.sort(key=lambda j: -strength[offset + j])
    nodes.append(tuple((names[int(best[offset + j])], j)
                       for j in inputs[:edges_per_node]))
  return CellGenotype(tuple(nodes))


def derive_darts(alpha_normal: Any, alpha_reduce: Any,
                 op_names: Sequence[str], num_nodes: int = 4,
                 edges_per_node: int = 2, candidate_mask: Any = None,
                 reduce_mask: Any = SAME_AS_NORMAL) -> Genotype:
  """Derives a genotype with the DARTS magnitude rule (DARTS section 2.4).

  Per edge, α is turned into weights by a softmax over the allowed candidates.
  The edge's op is the one with the largest weight other than ``none``, and
  the edge's strength is that weight. Each node keeps its ``edges_per_node``
  strongest incoming edges (fewer if fewer are selectable), listed strongest
  first; ties go to the lower input index. ``concat`` is all intermediates.

  Args:
    alpha_normal: ``[num_edges(num_nodes), len(op_names)]`` α of the normal
      cell, rows in :func:`edge_index` order; anything ``np.asarray`` accepts.
    alpha_reduce: the same for the reduction cell.
    op_names: candidate op names, the columns of α.
    num_nodes: intermediate nodes per cell.
    edges_per_node: incoming edges kept per node.
    candidate_mask: optional boolean ``[E, K]``; ``False`` marks candidates
      that are not part of the space on that edge (excluded from the softmax
      and never selected).
    reduce_mask: mask for the reduction cell. By default the same as
      ``candidate_mask``; pass ``None`` explicitly for no mask.

  Returns:
    The derived genotype.

  Raises:
    GenotypeError: on a shape mismatch (naming expected and actual shapes),
      non-finite α, or a mask row that allows nothing.
  """
  names = _check_op_names(op_names)
  num_nodes = check_num_nodes(num_nodes)
  if (isinstance(edges_per_node, bool)
      or not isinstance(edges_per_node, (int, np.integer))
      or edges_per_node < 1):
    raise GenotypeError(f"edges_per_node must be an integer >= 1, got "
                        f"{edges_per_node!r}")
  normal_mask, reduce_mask = _resolve_masks(candidate_mask, reduce_mask)
  return Genotype(
      _darts_cell(alpha_normal, normal_mask, names, num_nodes,
                  int(edges_per_node), "alpha_normal"),
      _darts_cell(alpha_reduce, reduce_mask, names, num_nodes,
                  int(edges_per_node), "alpha_reduce"))


def _argmax_cell(alpha: Any, mask: Any, names: list[str], num_nodes: int,
                 what: str) -> CellGenotype:
  w, allowed = _masked_softmax(alpha, mask, num_nodes, len(names), what)
  best = np.where(allowed, w, -np.inf).argmax(axis=1)
  nodes = []
  for i, offset in enumerate(node_offsets(num_nodes)):
    node = []
    for j in range(i + NUM_INPUTS):
      op = names[int(best[offset + j])]
      if op != NONE_OP:
        node.append((op, j))
    nodes.append(tuple(node))
  return CellGenotype(tuple(nodes))


def derive_argmax(alpha_normal: Any, alpha_reduce: Any,
                  op_names: Sequence[str], num_nodes: int = 4,
                  candidate_mask: Any = None,
                  reduce_mask: Any = SAME_AS_NORMAL) -> Genotype:
  """Derives the SNAS child graph: the argmax op of every edge.

  Per edge the op with the largest (softmax) weight among the allowed
  candidates is chosen, ``none`` included; edges whose choice is ``none`` are
  dropped. There is no top-k pruning, so a node may keep any number of edges,
  including zero. Edges are listed by input index; ``concat`` is all
  intermediates.

  Args:
    alpha_normal: ``[num_edges(num_nodes), len(op_names)]`` α (or logits) of
      the normal cell, rows in :func:`edge_index` order.
    alpha_reduce: the same for the reduction cell.
    op_names: candidate op names, the columns of α.
    num_nodes: intermediate nodes per cell.
    candidate_mask: optional boolean ``[E, K]``; ``False`` candidates are
      never selected.
    reduce_mask: mask for the reduction cell. By default the same as
      ``candidate_mask``; pass ``None`` explicitly for no mask.

  Returns:
    The derived genotype.

  Raises:
    GenotypeError: on a shape mismatch, non-finite α, or a mask row that
      allows nothing.
  """
  names = _check_op_names(op_names)
  num_nodes = check_num_nodes(num_nodes)
  normal_mask, reduce_mask = _resolve_masks(candidate_mask, reduce_mask)
  return Genotype(
      _argmax_cell(alpha_normal, normal_mask, names, num_nodes,
                   "alpha_normal"),
      _argmax_cell(alpha_reduce, reduce_mask, names, num_nodes,
                   "alpha_reduce"))
