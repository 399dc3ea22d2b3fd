"""Deriving genotypes from α: the DARTS magnitude rule and SNAS's argmax."""

import subprocess
import sys

import numpy as np

from tests.test_genotype import DARTS_OPS, expect_error
from tfnas import derive
from tfnas import genotype as G
from tfnas.genotype import Genotype


def test_module_does_not_import_tensorflow():
  code = ("import sys, tfnas.derive; "
          "sys.exit(1 if 'tensorflow' in sys.modules else 0)")
  assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---------------------------------------------------------------------------
# DARTS magnitude derivation.
# ---------------------------------------------------------------------------


def _alpha(num_nodes, ops, spec):
  """α of zeros with ``spec[(node, input)] = {op: value}`` filled in."""
  a = np.zeros((G.num_edges(num_nodes), len(ops)))
  for e, key in enumerate(G.edge_index(num_nodes)):
    for op, v in spec.get(key, {}).items():
      a[e, ops.index(op)] = v
  return a


# 'none' has the largest α on several edges; it must be ignored, and edge
# strength is the softmax weight (so a large 'none' weakens an edge).
HAND_SPEC = {
    (2, 0): {"sep_conv_3x3": 2},
    (2, 1): {"skip_connect": 1, "none": 6},
    (3, 0): {"max_pool_3x3": 1},
    (3, 1): {"sep_conv_3x3": 3},
    (3, 2): {"dil_conv_3x3": 2, "none": 8},
    # (4, 0): all zeros → weight 1/8, op max_pool_3x3 (first non-none).
    (4, 1): {"skip_connect": 2, "none": 9},
    (4, 2): {"sep_conv_3x3": 1},
    (4, 3): {"dil_conv_3x3": 1.5},
    (5, 0): {"skip_connect": 4, "none": 4},
    (5, 1): {"sep_conv_3x3": 4},
    (5, 2): {"none": 5},
    (5, 4): {"max_pool_3x3": 0.5},
}
HAND_NORMAL = (
    (("sep_conv_3x3", 0), ("skip_connect", 1)),
    (("sep_conv_3x3", 1), ("max_pool_3x3", 0)),
    (("dil_conv_3x3", 3), ("sep_conv_3x3", 2)),
    # Equal raw α (4 vs 4) but skip shares its edge with a large 'none'.
    (("sep_conv_3x3", 1), ("skip_connect", 0)),
)
# All-zero α: every op ties → first non-none op, inputs 0 and 1 (lower index).
ZERO_REDUCE = ((("max_pool_3x3", 0), ("max_pool_3x3", 1)),) * 4


def test_derive_darts_hand_built():
  a_normal = _alpha(4, DARTS_OPS, HAND_SPEC)
  a_reduce = np.zeros((14, len(DARTS_OPS)))
  g = derive.derive_darts(a_normal, a_reduce, DARTS_OPS)
  assert g.normal.nodes == HAND_NORMAL
  assert g.reduce.nodes == ZERO_REDUCE
  assert g.normal.concat == g.reduce.concat == (2, 3, 4, 5)
  assert "none" not in g.ops()
  # Lists are accepted too.
  assert derive.derive_darts(a_normal.tolist(), a_reduce.tolist(), DARTS_OPS) == g
  # `none` is found by name, not by its column: reversed columns give the
  # same cells (α without ties, whose order follows the columns).
  rng = np.random.default_rng(0)
  a_normal, a_reduce = rng.standard_normal((2, 14, len(DARTS_OPS)))
  a_normal[:, DARTS_OPS.index("none")] += 2  # `none` would win everywhere.
  g = derive.derive_darts(a_normal, a_reduce, DARTS_OPS)
  assert "none" not in g.ops()
  assert derive.derive_darts(a_normal[:, ::-1], a_reduce[:, ::-1],
                             DARTS_OPS[::-1]) == g


def test_derive_darts_edges_per_node():
  a = _alpha(4, DARTS_OPS, HAND_SPEC)
  g = derive.derive_darts(a, a, DARTS_OPS, edges_per_node=1)
  assert g.normal.nodes == tuple(node[:1] for node in HAND_NORMAL)
  g = derive.derive_darts(a, a, DARTS_OPS, edges_per_node=3)
  assert [len(n) for n in g.normal.nodes] == [2, 3, 3, 3]
  assert g.normal.nodes[1][2] == ("dil_conv_3x3", 2)


def test_derive_darts_mask():
  ops = ["none", "max_pool_3x3", "skip_connect", "sep_conv_3x3"]
  a = _alpha(2, ops, {(2, 0): {"none": 5, "max_pool_3x3": 1},
                      (2, 1): {"sep_conv_3x3": 2},
                      (3, 0): {"skip_connect": 3},
                      (3, 1): {"sep_conv_3x3": 1},
                      (3, 2): {"max_pool_3x3": 0.5}})
  g = derive.derive_darts(a, a, ops, num_nodes=2)
  assert g.normal.nodes == ((("sep_conv_3x3", 1), ("max_pool_3x3", 0)),
                            (("skip_connect", 0), ("sep_conv_3x3", 1)))
  mask = np.ones((5, 4), dtype=bool)
  mask[1, 3] = False   # sep_conv_3x3 not allowed on (2, 1).
  mask[2, 1:] = False  # Only 'none' allowed on (3, 0): never selected.
  g = derive.derive_darts(a, a, ops, num_nodes=2, candidate_mask=mask)
  for cell in (g.normal, g.reduce):  # Mask applies to both by default.
    # (2, 1): allowed none/max/skip all 1/3 → max_pool (lower op index).
    assert cell.nodes == ((("max_pool_3x3", 1), ("max_pool_3x3", 0)),
                          (("sep_conv_3x3", 1), ("max_pool_3x3", 2)))
  g = derive.derive_darts(a, a, ops, num_nodes=2, candidate_mask=mask,
                     reduce_mask=None)
  assert g.reduce.nodes == derive.derive_darts(a, a, ops, num_nodes=2).reduce.nodes
  assert g.normal.nodes != g.reduce.nodes


def test_derive_darts_shape_errors():
  a = np.zeros((14, 8))
  msg = expect_error("alpha_normal has shape (13, 8), expected (14, 8)",
                     derive.derive_darts, a[:13], a, DARTS_OPS)
  expect_error("alpha_reduce has shape (14, 7)", derive.derive_darts, a, a[:, :7],
               DARTS_OPS)
  expect_error("candidate_mask", derive.derive_darts, a, a, DARTS_OPS,
               candidate_mask=np.ones((14, 7), dtype=bool))
  bad = np.ones((14, 8), dtype=bool)
  bad[3] = False
  expect_error("edge 3 allows no candidate", derive.derive_darts, a, a, DARTS_OPS,
               candidate_mask=bad)
  nan = a.copy()
  nan[0, 0] = np.nan
  expect_error("non-finite", derive.derive_darts, nan, a, DARTS_OPS)
  assert "14 edges" in msg


# ---------------------------------------------------------------------------
# SNAS argmax derivation.
# ---------------------------------------------------------------------------


def test_derive_argmax_drops_none_and_keeps_all_edges():
  ops = ["none", "skip_connect", "sep_conv_3x3"]
  a = _alpha(3, ops, {
      (2, 0): {"none": 2, "sep_conv_3x3": 1},
      (2, 1): {"none": 1},
      (3, 0): {"sep_conv_3x3": 1},
      (3, 1): {"skip_connect": 1},
      (3, 2): {"sep_conv_3x3": 2, "none": 1},
      (4, 0): {"none": 1}, (4, 1): {"none": 1}, (4, 2): {"none": 1},
      (4, 3): {"skip_connect": 0.5},
  })
  g = derive.derive_argmax(a, a, ops, num_nodes=3)
  assert g.normal.nodes == (
      (),
      (("sep_conv_3x3", 0), ("skip_connect", 1), ("sep_conv_3x3", 2)),
      (("skip_connect", 3),),
  )
  assert g.normal.concat == (2, 3, 4)
  assert Genotype.from_json(g.to_json()) == g


def test_derive_argmax_mask():
  ops = ["none", "skip_connect", "sep_conv_3x3"]
  a = _alpha(1, ops, {(2, 0): {"none": 3, "skip_connect": 2},
                      (2, 1): {"sep_conv_3x3": 1}})
  assert derive.derive_argmax(a, a, ops, num_nodes=1).normal.nodes == (
      (("sep_conv_3x3", 1),),)
  mask = np.array([[False, True, True], [True, True, False]])
  g = derive.derive_argmax(a, a, ops, num_nodes=1, candidate_mask=mask)
  # (2, 0): 'none' masked → skip; (2, 1): sep masked → none/skip tie → none.
  assert g.normal.nodes == ((("skip_connect", 0),),)
  assert g.reduce == g.normal
  expect_error("alpha_normal has shape", derive.derive_argmax, a[:1], a, ops,
               num_nodes=1)
