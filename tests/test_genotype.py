"""Tests for tfnas.genotype: data format and validation (the α → genotype
rules are in test_derive.py)."""

import json
import os
import stat
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


def test_a_block_genotype_says_where_it_belongs(tmp_path):
  from tfnas.block_genotype import BlockGenotype
  path = str(tmp_path / "genotype.json")
  BlockGenotype(("choice_3", "choice_x")).save(path)
  expect_error("block genotype (a ShuffleNet child of a DSNAS search), not a "
               "cell genotype", Genotype.load, path)


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
  d = valid_dict()
  d["normal"]["nodes"][1][1] = ["sep_conv_3x3", 3]  # Node 3 reads itself.
  expect_error("normal node 3 edge 1: input 3 is not an earlier node "
               "(allowed 0..2)", Genotype.from_dict, d)


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
  d["normal"]["concat"] = [1, 2, 3]  # An input of the cell.
  expect_error("normal concat: index 1 is out of range (allowed "
               "intermediate nodes 2..5)", Genotype.from_dict, d)
  d["normal"]["concat"] = [2, 3, 3]
  expect_error("normal concat: [2, 3, 3] repeats a node", Genotype.from_dict,
               d)


def test_empty_cell():
  d = valid_dict()
  d["normal"] = {"nodes": [], "concat": []}
  expect_error("normal: cell is empty", Genotype.from_dict, d)


def test_warnings_of_valid_genotypes_that_cannot_learn_well():
  from tfnas import genotypes
  assert genotypes.resolve("DARTS_V2").warnings() == []
  cell = CellGenotype(((("none", 0), ("sep_conv_3x3", 1)), ()),
                      concat=(2, 3))
  dead = CellGenotype(((("noise", 0),), (("skip_connect", 2),)))
  assert Genotype(cell, dead).warnings() == [
      "normal node 2: a none edge adds zeros",
      "normal node 3 has no inputs: its value is 0",
      "reduce cell uses noise: random at inference too",
      "the reduce cell's output does not depend on its inputs"]
  # A search child's `none` edges are dropped edges: only the rest is said.
  assert Genotype(cell, dead).warnings(none_edges=False) == [
      "normal node 3 has no inputs: its value is 0",
      "reduce cell uses noise: random at inference too",
      "the reduce cell's output does not depend on its inputs"]
  # Every node empty: nothing reaches the output.
  empty = CellGenotype(((), ()))
  assert ("the normal cell's output does not depend on its inputs" in
          Genotype(empty, cell).warnings())


def _flat(cell):
  return [tuple(edge) for node in cell.nodes for edge in node]


def test_darts_code_forms_of_a_genotype_file(tmp_path):
  from tfnas import genotypes
  v2 = genotypes.resolve("DARTS_V2")
  text = tmp_path / "v2.txt"
  # As the DARTS code prints it (its namedtuple's repr).
  text.write_text(f"Genotype(normal={_flat(v2.normal)!r}, "
                  f"normal_concat=range(2, 6), reduce={_flat(v2.reduce)!r}, "
                  f"reduce_concat=[2, 3, 4, 5])\n")
  assert genotypes.resolve(str(text)) == v2
  flat = tmp_path / "v2.json"
  flat.write_text(json.dumps({"normal": _flat(v2.normal),
                              "normal_concat": [2, 3, 4, 5],
                              "reduce": _flat(v2.reduce)}))
  assert genotypes.resolve(str(flat)) == v2
  bad = tmp_path / "bad.txt"
  bad.write_text(text.read_text().replace("sep_conv_3x3", "sep_conv_9x9", 1))
  with pytest.raises(GenotypeError, match=r"bad.txt: DARTS genotype: .*"
                                          r"sep_conv_9x9"):
    genotypes.resolve(str(bad))
  # Neither form: the JSON error, and where the format is described.
  other = tmp_path / "other.json"
  other.write_text('{"normal": {"nodes": []}}')
  with pytest.raises(GenotypeError, match=r"missing key 'version'.*"
                                          r"'Genotype files'"):
    genotypes.resolve(str(other))
  code = tmp_path / "code.py"
  code.write_text("Genotype(normal=__import__('os').getcwd())")
  with pytest.raises(GenotypeError, match="not valid JSON"):
    genotypes.resolve(str(code))
  # tfnas' own per-cell objects without a version: that is what is said.
  nodes = tmp_path / "nodes.json"
  nodes.write_text(json.dumps({"normal": {"nodes": [[["skip_connect", 0]]]},
                               "reduce": {"nodes": [[["skip_connect", 1]]]}}))
  with pytest.raises(GenotypeError, match="missing key 'version'"):
    genotypes.resolve(str(nodes))
  # Unordered edges (a set literal), a range no cell has, deep nesting:
  # one-line errors, nothing expanded.
  unordered = tmp_path / "set.txt"
  unordered.write_text(text.read_text().replace(
      f"normal={_flat(v2.normal)!r}", "normal={('skip_connect', 0)}"))
  with pytest.raises(GenotypeError, match="not valid JSON"):
    genotypes.resolve(str(unordered))
  huge = tmp_path / "huge.txt"
  huge.write_text(text.read_text().replace("range(2, 6)",
                                           "range(2, 1000000000000)"))
  with pytest.raises(GenotypeError, match=r"huge.txt: DARTS genotype: "
                                          r"normal_concat=range.* names "
                                          r"999999999998 nodes"):
    genotypes.resolve(str(huge))
  deep = tmp_path / "deep.json"
  deep.write_text("[" * 100000 + "]" * 100000)
  with pytest.raises(GenotypeError, match="nested too deeply"):
    genotypes.resolve(str(deep))


def test_readme_genotype_example_is_a_valid_genotype():
  import re
  readme = open(os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "README.md")).read()
  block = next(b for b in re.findall(r"```json\n(.*?)\n```", readme, re.S)
               if '"nodes"' in b)
  example = Genotype.from_json(block, op_names=DARTS_OPS)
  assert example.normal.concat == (2, 3) and example.reduce.concat == (2, 3)
  assert example.warnings() == []


def test_corrupt_json_file(tmp_path):
  path = tmp_path / "genotype.json"
  path.write_text('{"version": 1, "normal": ')
  msg = expect_error("not valid JSON", Genotype.load, path)
  assert str(path) in msg
  path.write_text('{"version": 1, "normal": "abc')  # Cut inside a string.
  expect_error("not valid JSON (Unterminated string starting at line 1 "
               "column 26)", Genotype.load, path)
  path.write_bytes(b"\xff\xfe\x00garbage")
  expect_error("not valid JSON", Genotype.load, path)
  path.write_text("[1, 2]")
  expect_error("expected a JSON object", Genotype.load, path)
  path.write_text("[" * 100000 + "]" * 100000)  # Python's JSON recursion.
  expect_error("not valid JSON (nested too deeply)", Genotype.load, path)


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


def test_saved_genotype_has_the_mode_of_a_plain_new_file(tmp_path):
  # Readable by the group like the rest of a shared run directory (a temp
  # file alone would be owner-only).
  old = os.umask(0o027)
  try:
    darts_v2().save(tmp_path / "genotype.json")
    (tmp_path / "plain").write_text("")
  finally:
    os.umask(old)
  mode = stat.S_IMODE(os.stat(tmp_path / "genotype.json").st_mode)
  assert mode == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode) == 0o640


def test_a_block_genotype_of_another_version_is_refused():
  from tfnas.block_genotype import BlockGenotype
  from tfnas.genotype import GenotypeError
  for version in (2, None):
    with pytest.raises(GenotypeError, match="unsupported block genotype "
                                            "version"):
      BlockGenotype.from_dict({"kind": "blocks", "version": version,
                               "blocks": ["choice_3"]})


# a run directory path that does not exist is
# named as a missing file, not taken for an unknown published name.
def test_a_missing_run_directory_is_named(tmp_path):
  from tfnas import genotypes
  from tfnas.genotype import GenotypeError
  with pytest.raises(GenotypeError, match=r"no_such_run.*not found"):
    genotypes.resolve(str(tmp_path / "no_such_run"))
