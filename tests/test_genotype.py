"""Tests for tfnas.genotype: data format, validation and α → genotype rules."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tfnas import genotype as G
from tfnas.genotype import CellGenotype, Genotype, GenotypeError

DARTS_OPS = ["none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
             "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]

# DARTS_V2 from the DARTS repository (genotypes.py).
DARTS_V2_NORMAL = [("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
                   ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
                   ("sep_conv_3x3", 1), ("skip_connect", 0),
                   ("skip_connect", 0), ("dil_conv_3x3", 2)]
DARTS_V2_REDUCE = [("max_pool_3x3", 0), ("max_pool_3x3", 1),
                   ("skip_connect", 2), ("max_pool_3x3", 1),
                   ("max_pool_3x3", 0), ("skip_connect", 2),
                   ("skip_connect", 2), ("max_pool_3x3", 1)]


def darts_v2():
  return Genotype.from_darts(DARTS_V2_NORMAL, range(2, 6),
                             DARTS_V2_REDUCE, range(2, 6))


def valid_dict():
  return darts_v2().to_dict()


def expect_error(fragment, fn, *args, **kwargs):
  with pytest.raises(GenotypeError) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert fragment in message, message
  assert "\n" not in message
  return message


# ---------------------------------------------------------------------------
# Edge enumeration.
# ---------------------------------------------------------------------------


def test_edge_index_and_num_edges():
  idx = G.edge_index(4)
  assert len(idx) == 14 == G.num_edges(4)
  assert idx[:7] == [(2, 0), (2, 1), (3, 0), (3, 1), (3, 2), (4, 0), (4, 1)]
  assert idx[-1] == (5, 4)
  for n in range(1, 7):
    assert len(G.edge_index(n)) == G.num_edges(n)
  expect_error("num_nodes", G.num_edges, 0)


# ---------------------------------------------------------------------------
# Data format.
# ---------------------------------------------------------------------------


def test_from_darts_v2():
  g = darts_v2()
  for cell in (g.normal, g.reduce):
    assert cell.num_nodes == 4
    assert all(len(node) == 2 for node in cell.nodes)
    assert cell.concat == (2, 3, 4, 5)
  assert g.normal.nodes[0] == (("sep_conv_3x3", 0), ("sep_conv_3x3", 1))
  assert g.normal.nodes[3] == (("skip_connect", 0), ("dil_conv_3x3", 2))
  assert g.reduce.nodes[1] == (("skip_connect", 2), ("max_pool_3x3", 1))
  assert g.ops() == {"sep_conv_3x3", "skip_connect", "dil_conv_3x3",
                     "max_pool_3x3"}
  assert g.version == Genotype.FORMAT_VERSION == 1


def test_from_darts_rejects_odd_length():
  expect_error("darts normal", Genotype.from_darts, DARTS_V2_NORMAL[:3],
               range(2, 4), DARTS_V2_REDUCE, range(2, 6))


def test_lists_normalised_to_tuples_and_default_concat():
  cell = CellGenotype([[["skip_connect", 0]], [["sep_conv_3x3", np.int64(2)]]])
  assert cell.nodes == ((("skip_connect", 0),), (("sep_conv_3x3", 2),))
  assert isinstance(cell.nodes[1][0][1], int)
  assert cell.concat == (2, 3)
  hash(cell)


def test_json_round_trip():
  g = darts_v2()
  text = g.to_json()
  assert json.loads(text)["normal"]["nodes"][0] == [["sep_conv_3x3", 0],
                                                    ["sep_conv_3x3", 1]]
  assert json.loads(text)["version"] == 1
  assert Genotype.from_json(text) == g
  assert Genotype.from_dict(g.to_dict()) == g


def test_round_trip_variable_edge_counts():
  cell = CellGenotype(((), (("skip_connect", 0), ("sep_conv_3x3", 1),
                            ("max_pool_3x3", 2)),), concat=(3,))
  g = Genotype(cell, cell)
  assert Genotype.from_json(g.to_json()) == g
  assert "node 2 <- (no inputs)" in str(g)


def test_save_load(tmp_path):
  g = darts_v2()
  path = tmp_path / "genotype.json"
  g.save(path)
  assert Genotype.load(path) == g
  assert Genotype.load(str(path)) == g
  assert os.listdir(tmp_path) == ["genotype.json"]  # No temp file left.
  g.save(path)  # Overwrite is fine.
  assert Genotype.load(path, op_names=DARTS_OPS) == g


def test_str():
  text = str(darts_v2())
  assert "normal" in text and "reduce" in text
  assert "node 2 <- sep_conv_3x3(0), sep_conv_3x3(1)" in text
  assert "node 5 <- skip_connect(0), dil_conv_3x3(2)" in text
  assert "concat: 2, 3, 4, 5" in text


# ---------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------


def test_missing_key():
  d = valid_dict()
  del d["reduce"]
  expect_error("genotype: missing key 'reduce'", Genotype.from_dict, d)
  d = valid_dict()
  del d["normal"]["nodes"]
  expect_error("missing key 'normal.nodes'", Genotype.from_dict, d)


def test_unknown_key():
  d = valid_dict()
  d["nomal"] = d["normal"]
  expect_error("unknown key 'nomal'", Genotype.from_dict, d)


def test_bad_version():
  d = valid_dict()
  d["version"] = 7
  msg = expect_error("unsupported genotype version 7", Genotype.from_dict, d)
  assert "supported versions: [1]" in msg
  expect_error("unsupported genotype version", Genotype,
               darts_v2().normal, darts_v2().reduce, version=2)


def test_bad_input_index():
  d = valid_dict()
  d["normal"]["nodes"][1][1] = ["sep_conv_3x3", 5]
  expect_error("normal node 3 edge 1: input 5 is not an earlier node "
               "(allowed 0..2)", Genotype.from_dict, d)
  d = valid_dict()
  d["reduce"]["nodes"][0][0] = ["sep_conv_3x3", -1]
  expect_error("reduce node 2 edge 0: input -1", Genotype.from_dict, d)


def test_malformed_edge():
  d = valid_dict()
  d["normal"]["nodes"][0][0] = ["sep_conv_3x3"]
  expect_error("normal node 2 edge 0: malformed edge", Genotype.from_dict, d)
  d = valid_dict()
  d["normal"]["nodes"][0][0] = ["sep_conv_3x3", "1"]
  expect_error("input index must be an integer", Genotype.from_dict, d)
  d = valid_dict()
  d["normal"]["nodes"][0][0] = [3, 1]
  expect_error("op name must be a non-empty string", Genotype.from_dict, d)


def test_unknown_op():
  d = valid_dict()
  d["reduce"]["nodes"][2][0] = ["sep_conv_9x9", 0]
  msg = expect_error("reduce node 4 edge 0: unknown op 'sep_conv_9x9'",
                     Genotype.from_dict, d, op_names=DARTS_OPS)
  assert "known ops" in msg and "skip_connect" in msg
  g = Genotype.from_dict(d)  # Op names are only checked when given.
  expect_error("unknown op 'sep_conv_9x9'", g.validate, DARTS_OPS)


def test_bad_concat():
  d = valid_dict()
  d["normal"]["concat"] = [2, 3, 6]
  expect_error("normal concat: index 6 is out of range (allowed intermediate "
               "nodes 2..5)", Genotype.from_dict, d)
  d["normal"]["concat"] = []
  expect_error("normal concat: is empty", Genotype.from_dict, d)


def test_empty_cell():
  d = valid_dict()
  d["normal"] = {"nodes": [], "concat": []}
  expect_error("normal: cell is empty", Genotype.from_dict, d)


def test_corrupt_json_file(tmp_path):
  path = tmp_path / "genotype.json"
  path.write_text('{"version": 1, "normal": ')
  msg = expect_error("not valid JSON", Genotype.load, path)
  assert str(path) in msg
  path.write_bytes(b"\xff\xfe\x00garbage")
  expect_error("not valid JSON", Genotype.load, path)
  path.write_text("[1, 2]")
  expect_error("expected a JSON object", Genotype.load, path)


def test_invalid_file_names_path(tmp_path):
  path = tmp_path / "genotype.json"
  d = valid_dict()
  del d["reduce"]
  path.write_text(json.dumps(d))
  expect_error(f"{path}: missing key 'reduce'", Genotype.load, path)


def test_missing_file(tmp_path):
  path = tmp_path / "nope" / "genotype.json"
  msg = expect_error("not found", Genotype.load, path)
  assert str(path) in msg


def test_module_does_not_import_tensorflow():
  code = ("import sys, tfnas.genotype; "
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
  g = G.derive_darts(a_normal, a_reduce, DARTS_OPS)
  assert g.normal.nodes == HAND_NORMAL
  assert g.reduce.nodes == ZERO_REDUCE
  assert g.normal.concat == g.reduce.concat == (2, 3, 4, 5)
  assert "none" not in g.ops()
  # Lists are accepted too.
  assert G.derive_darts(a_normal.tolist(), a_reduce.tolist(), DARTS_OPS) == g


def test_derive_darts_edges_per_node():
  a = _alpha(4, DARTS_OPS, HAND_SPEC)
  g = G.derive_darts(a, a, DARTS_OPS, edges_per_node=1)
  assert g.normal.nodes == tuple(node[:1] for node in HAND_NORMAL)
  g = G.derive_darts(a, a, DARTS_OPS, edges_per_node=3)
  assert [len(n) for n in g.normal.nodes] == [2, 3, 3, 3]
  assert g.normal.nodes[1][2] == ("dil_conv_3x3", 2)


def test_derive_darts_mask():
  ops = ["none", "max_pool_3x3", "skip_connect", "sep_conv_3x3"]
  a = _alpha(2, ops, {(2, 0): {"none": 5, "max_pool_3x3": 1},
                      (2, 1): {"sep_conv_3x3": 2},
                      (3, 0): {"skip_connect": 3},
                      (3, 1): {"sep_conv_3x3": 1},
                      (3, 2): {"max_pool_3x3": 0.5}})
  g = G.derive_darts(a, a, ops, num_nodes=2)
  assert g.normal.nodes == ((("sep_conv_3x3", 1), ("max_pool_3x3", 0)),
                            (("skip_connect", 0), ("sep_conv_3x3", 1)))
  mask = np.ones((5, 4), dtype=bool)
  mask[1, 3] = False   # sep_conv_3x3 not allowed on (2, 1).
  mask[2, 1:] = False  # Only 'none' allowed on (3, 0): never selected.
  g = G.derive_darts(a, a, ops, num_nodes=2, candidate_mask=mask)
  for cell in (g.normal, g.reduce):  # Mask applies to both by default.
    # (2, 1): allowed none/max/skip all 1/3 → max_pool (lower op index).
    assert cell.nodes == ((("max_pool_3x3", 1), ("max_pool_3x3", 0)),
                          (("sep_conv_3x3", 1), ("max_pool_3x3", 2)))
  g = G.derive_darts(a, a, ops, num_nodes=2, candidate_mask=mask,
                     reduce_mask=None)
  assert g.reduce.nodes == G.derive_darts(a, a, ops, num_nodes=2).reduce.nodes
  assert g.normal.nodes != g.reduce.nodes


def test_derive_darts_shape_errors():
  a = np.zeros((14, 8))
  msg = expect_error("alpha_normal has shape (13, 8), expected (14, 8)",
                     G.derive_darts, a[:13], a, DARTS_OPS)
  expect_error("alpha_reduce has shape (14, 7)", G.derive_darts, a, a[:, :7],
               DARTS_OPS)
  expect_error("candidate_mask", G.derive_darts, a, a, DARTS_OPS,
               candidate_mask=np.ones((14, 7), dtype=bool))
  bad = np.ones((14, 8), dtype=bool)
  bad[3] = False
  expect_error("edge 3 allows no candidate", G.derive_darts, a, a, DARTS_OPS,
               candidate_mask=bad)
  nan = a.copy()
  nan[0, 0] = np.nan
  expect_error("non-finite", G.derive_darts, nan, a, DARTS_OPS)
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
  g = G.derive_argmax(a, a, ops, num_nodes=3)
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
  assert G.derive_argmax(a, a, ops, num_nodes=1).normal.nodes == (
      (("sep_conv_3x3", 1),),)
  mask = np.array([[False, True, True], [True, True, False]])
  g = G.derive_argmax(a, a, ops, num_nodes=1, candidate_mask=mask)
  # (2, 0): 'none' masked → skip; (2, 1): sep masked → none/skip tie → none.
  assert g.normal.nodes == ((("skip_connect", 0),),)
  assert g.reduce == g.normal
  expect_error("alpha_normal has shape", G.derive_argmax, a[:1], a, ops,
               num_nodes=1)
