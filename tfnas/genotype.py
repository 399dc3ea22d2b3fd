"""The derived architecture (genotype) of a DARTS-space cell network, as data.

A cell has two input nodes (index 0 is the output of cell ``k-2``, index 1 the
output of cell ``k-1``) and ``N`` intermediate nodes with indices ``2..N+1``.
Intermediate node ``i`` (0-based among the intermediates, absolute index
``i + 2``) sums any number of incoming edges; each edge is an
``(op_name, input_node_index)`` pair reading from an earlier node. The cell
output concatenates the nodes listed in ``concat``.

``tfnas.derive`` turns architecture parameters α into genotypes.

It is pure Python plus numpy and deliberately does not import TensorFlow, so
that tools that only read or print genotypes start fast.

JSON format (``Genotype.FORMAT_VERSION == 1``)::

    {"version": 1,
     "normal": {"nodes": [[["sep_conv_3x3", 0], ["skip_connect", 1]], ...],
                "concat": [2, 3, 4, 5]},
     "reduce": {...}}
"""

from __future__ import annotations


import dataclasses
import json
import os
import tempfile
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import numpy as np

from tfnas.errors import TfnasError
from tfnas.train.rundir import new_file_mode

__all__ = [
    "Edge",
    "GenotypeError",
    "CellGenotype",
    "Genotype",
    "SUPPORTED_VERSIONS",
    "NONE_OP",
    "RANDOM_OPS",
    "num_edges",
    "edge_index",
    "check_num_nodes",
    "node_offsets",
    "NUM_INPUTS",
]

#: One incoming edge of an intermediate node: ``(op_name, input_node_index)``.
Edge = tuple[str, int]

#: Genotype file format versions this module can read.
SUPPORTED_VERSIONS = (1,)

#: Name of the zero op; never chosen by the DARTS magnitude rule, and marks a
#: dropped edge for the argmax rule.
NONE_OP = "none"

#: Ops whose output is random at inference too and ignores the input (the S4
#: space's noise): a network using one answers the same input differently
#: each time (`tfnas.export` refuses it unless allowed).
RANDOM_OPS = frozenset({"noise"})

NUM_INPUTS = 2
_CELL_NAMES = ("normal", "reduce")


class GenotypeError(TfnasError):
  """A genotype (or the data it was parsed from) is malformed."""


class _SameAsNormal:
  """Sentinel: the reduce-cell mask defaults to the normal-cell mask."""

  def __repr__(self) -> str:
    return "SAME_AS_NORMAL"


#: Default of ``reduce_mask``: use ``candidate_mask`` for the reduce cell too.
SAME_AS_NORMAL = _SameAsNormal()


# ----------------------------------------------------------------------------
# Edge enumeration.
# ----------------------------------------------------------------------------


def check_num_nodes(num_nodes: Any) -> int:
  """``num_nodes`` as an int, or a GenotypeError if it is not one >= 1."""
  if (isinstance(num_nodes, bool)
      or not isinstance(num_nodes, (int, np.integer)) or num_nodes < 1):
    raise GenotypeError(f"num_nodes must be an integer >= 1, got "
                        f"{num_nodes!r}")
  return int(num_nodes)


def num_edges(num_nodes: int) -> int:
  """Number of candidate edges in a cell with ``num_nodes`` intermediates.

  Intermediate node ``i`` has ``2 + i`` incoming candidate edges, so the total
  is ``sum(2 + i for i in range(num_nodes))`` (14 for 4 nodes).

  Args:
    num_nodes: number of intermediate nodes (>= 1).

  Returns:
    The number of edges.

  Raises:
    GenotypeError: if ``num_nodes`` is not a positive integer.
  """
  n = check_num_nodes(num_nodes)
  return n * NUM_INPUTS + n * (n - 1) // 2


def edge_index(num_nodes: int) -> list[tuple[int, int]]:
  """The ``(node_index, input_index)`` pair of every edge, in α row order.

  Edges are enumerated node by node; node ``i`` (absolute index ``i + 2``)
  contributes edges from inputs ``0..i+1`` in increasing order. For 4 nodes
  this starts ``[(2, 0), (2, 1), (3, 0), (3, 1), (3, 2), ...]``.

  Args:
    num_nodes: number of intermediate nodes (>= 1).

  Returns:
    A list of ``num_edges(num_nodes)`` pairs.

  Raises:
    GenotypeError: if ``num_nodes`` is not a positive integer.
  """
  n = check_num_nodes(num_nodes)
  return [(i + NUM_INPUTS, j) for i in range(n) for j in range(i + NUM_INPUTS)]


def node_offsets(num_nodes: int) -> list[int]:
  """Row offset in α of the first edge of each intermediate node."""
  offsets, total = [], 0
  for i in range(num_nodes):
    offsets.append(total)
    total += NUM_INPUTS + i
  return offsets


# ----------------------------------------------------------------------------
# Data classes.
# ----------------------------------------------------------------------------


def _is_sequence(obj: Any) -> bool:
  return isinstance(obj, (list, tuple))


def _as_index(obj: Any) -> Any:
  """Python int for int-like values (not bools); anything else unchanged."""
  if isinstance(obj, (int, np.integer)) and not isinstance(obj, (bool,
                                                                  np.bool_)):
    return int(obj)
  return obj


def _normalise_nodes(nodes: Any) -> Any:
  """Lists → tuples, numpy ints → ints; leaves malformed parts for validate."""
  if not _is_sequence(nodes):
    return nodes
  out = []
  for node in nodes:
    if not _is_sequence(node):
      out.append(node)
      continue
    edges = []
    for edge in node:
      if _is_sequence(edge) and len(edge) == 2:
        op, idx = edge
        if isinstance(op, np.str_):
          op = str(op)
        edges.append((op, _as_index(idx)))
      else:
        edges.append(edge)
    out.append(tuple(edges))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class CellGenotype:
  """The derived structure of one cell type.

  Attributes:
    nodes: one tuple of ``(op_name, input_index)`` edges per intermediate
      node, in node order. A node may have any number of edges (including
      none, e.g. an SNAS child graph that dropped them all).
    concat: absolute node indices whose outputs are concatenated to form the
      cell output. Defaults to all intermediates ``2..N+1``.

  Lists are converted to tuples on construction, so instances are hashable
  and compare equal regardless of the container types they were built from.
  Structural validation happens in :meth:`validate` (called by
  :class:`Genotype` on construction).
  """
  nodes: tuple[tuple[Edge, ...], ...]
  concat: tuple[int, ...] | None = None

  def __post_init__(self):
    nodes = _normalise_nodes(self.nodes)
    object.__setattr__(self, "nodes", nodes)
    concat = self.concat
    if concat is None:
      n = len(nodes) if _is_sequence(nodes) else 0
      concat = tuple(range(NUM_INPUTS, NUM_INPUTS + n))
    elif isinstance(concat, (list, tuple, range)):
      concat = tuple(_as_index(c) for c in concat)
    object.__setattr__(self, "concat", concat)

  @property
  def num_nodes(self) -> int:
    """Number of intermediate nodes."""
    return len(self.nodes)

  def edges(self) -> list[tuple[int, str, int]]:
    """All edges as ``(node_index, op_name, input_index)`` triples."""
    return [(i + NUM_INPUTS, op, j)
            for i, node in enumerate(self.nodes) for op, j in node]

  def ops(self) -> set[str]:
    """The set of op names used by this cell."""
    return {op for _, op, _ in self.edges()}

  def validate(self, op_names: Iterable[str] | None = None,
               name: str = "cell") -> None:
    """Checks the cell's structure.

    Args:
      op_names: if given, every edge's op must be one of these names.
      name: how to refer to the cell in error messages (e.g. ``"normal"``).

    Raises:
      GenotypeError: naming the first problem found (empty cell, malformed
        edge, input index that is not an earlier node, unknown op, concat
        index out of range).
    """
    known = None if op_names is None else set(op_names)
    nodes = self.nodes
    if not _is_sequence(nodes):
      raise GenotypeError(f"{name} nodes: expected a list with one list of "
                          f"edges per intermediate node, got {nodes!r}")
    if not nodes:
      raise GenotypeError(f"{name}: cell is empty (no intermediate nodes); "
                          f"give at least one node")
    for i, node in enumerate(nodes):
      where = f"{name} node {i + NUM_INPUTS}"
      if not _is_sequence(node):
        raise GenotypeError(f"{where}: expected a list of [op_name, "
                            f"input_index] edges, got {node!r}")
      for e, edge in enumerate(node):
        at = f"{where} edge {e}"
        if not (_is_sequence(edge) and len(edge) == 2):
          raise GenotypeError(f"{at}: malformed edge {edge!r}; expected "
                              f"[op_name, input_index]")
        op, idx = edge
        if not isinstance(op, str) or not op:
          raise GenotypeError(f"{at}: op name must be a non-empty string, "
                              f"got {op!r}")
        if not isinstance(idx, int) or isinstance(idx, bool):
          raise GenotypeError(f"{at}: input index must be an integer, got "
                              f"{idx!r}")
        last = i + NUM_INPUTS - 1
        if not 0 <= idx <= last:
          raise GenotypeError(f"{at}: input {idx} is not an earlier node "
                              f"(allowed 0..{last})")
        if known is not None and op not in known:
          raise GenotypeError(f"{at}: unknown op {op!r}; known ops: "
                              f"{sorted(known)}")
    concat = self.concat
    if not isinstance(concat, tuple):
      raise GenotypeError(f"{name} concat: expected a list of node indices, "
                          f"got {concat!r}")
    if not concat:
      raise GenotypeError(f"{name} concat: is empty; list at least one node "
                          f"index to form the cell output")
    first, last = NUM_INPUTS, len(nodes) + NUM_INPUTS - 1
    for c in concat:
      if not isinstance(c, int) or isinstance(c, bool):
        raise GenotypeError(f"{name} concat: index must be an integer, got "
                            f"{c!r}")
      if not first <= c <= last:
        raise GenotypeError(f"{name} concat: index {c} is out of range "
                            f"(allowed intermediate nodes {first}..{last})")
    if len(set(concat)) != len(concat):
      raise GenotypeError(f"{name} concat: {list(concat)} repeats a node "
                          f"index; list each node once")

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready dict ``{"nodes": [[[op, input], ...], ...], "concat": [...]}``."""
    return {
        "nodes": [[[op, idx] for op, idx in node] for node in self.nodes],
        "concat": list(self.concat),
    }

  def format_lines(self) -> list[str]:
    """Readable lines, one per node plus a concat line."""
    lines = []
    for i, node in enumerate(self.nodes):
      inputs = ", ".join(f"{op}({idx})" for op, idx in node) or "(no inputs)"
      lines.append(f"node {i + NUM_INPUTS} <- {inputs}")
    lines.append("concat: " + ", ".join(str(c) for c in self.concat))
    return lines


@dataclasses.dataclass(frozen=True)
class Genotype:
  """A derived DARTS-space architecture: one normal and one reduction cell.

  Attributes:
    normal: structure shared by all normal cells.
    reduce: structure shared by all reduction cells.
    version: file format version (see ``FORMAT_VERSION``).

  Construction validates the structure (not op names; use
  :meth:`validate` with ``op_names`` for that).

  Raises:
    GenotypeError: on construction if the genotype is malformed.
  """
  FORMAT_VERSION: ClassVar[int] = 1

  normal: CellGenotype
  reduce: CellGenotype
  version: int = 1

  def __post_init__(self):
    self.validate()

  # -- validation ------------------------------------------------------------

  def validate(self, op_names: Iterable[str] | None = None) -> None:
    """Checks version and both cells.

    Args:
      op_names: if given, every op used must be one of these names.

    Raises:
      GenotypeError: naming the first problem found.
    """
    if (isinstance(self.version, bool) or not isinstance(self.version, int)
        or self.version not in SUPPORTED_VERSIONS):
      raise GenotypeError(f"unsupported genotype version {self.version!r}; "
                          f"supported versions: {list(SUPPORTED_VERSIONS)}")
    known = None if op_names is None else list(op_names)
    for name in _CELL_NAMES:
      cell = getattr(self, name)
      if not isinstance(cell, CellGenotype):
        raise GenotypeError(f"{name}: expected a CellGenotype, got "
                            f"{type(cell).__name__}; build it with "
                            f"CellGenotype(nodes, concat)")
      cell.validate(known, name=name)

  # -- queries ---------------------------------------------------------------

  def ops(self) -> set[str]:
    """The set of op names used by either cell."""
    return self.normal.ops() | self.reduce.ops()

  def warnings(self, none_edges: bool = True) -> list[str]:
    """What makes this genotype's network learn or predict badly though it
    is valid: ``none`` edges (they add zeros; left out with
    ``none_edges=False``, e.g. for a child whose ``none`` edges are dropped
    edges), nodes without inputs, random ops, and cells whose output does
    not depend on their inputs."""
    found = []
    for name in _CELL_NAMES:
      cell = getattr(self, name)
      depends = {0, 1}  # Nodes whose value depends on the cell's inputs.
      for i, node in enumerate(cell.nodes):
        index = i + NUM_INPUTS
        live = [(op, j) for op, j in node if op != NONE_OP]
        if none_edges and len(live) < len(node):
          found.append(f"{name} node {index}: a {NONE_OP} edge adds zeros")
        if not live:
          found.append(f"{name} node {index} has no inputs: its value is 0")
        if any(op not in RANDOM_OPS and j in depends for op, j in live):
          depends.add(index)
      for op in sorted(cell.ops() & RANDOM_OPS):
        found.append(f"{name} cell uses {op}: random at inference too")
      if not depends.intersection(cell.concat):
        found.append(f"the {name} cell's output does not depend on its "
                     f"inputs")
    return found

  def __str__(self) -> str:
    lines = [f"Genotype (version {self.version})"]
    for name in _CELL_NAMES:
      lines.append(f"{name} cell:")
      lines.extend("  " + line for line in getattr(self, name).format_lines())
    return "\n".join(lines)

  # -- dict / JSON -----------------------------------------------------------

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready dict ``{"version": 1, "normal": {...}, "reduce": {...}}``."""
    return {
        "version": self.version,
        "normal": self.normal.to_dict(),
        "reduce": self.reduce.to_dict(),
    }

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], source: str = "genotype",
                op_names: Iterable[str] | None = None) -> "Genotype":
    """Builds and validates a genotype from its dict form.

    Args:
      d: a dict as produced by :meth:`to_dict`. ``concat`` may be omitted
        (defaults to all intermediates).
      source: how to refer to the data in error messages (e.g. a file path).
      op_names: if given, also check that every op is one of these names.

    Returns:
      The genotype.

    Raises:
      GenotypeError: ``"<source>: <problem>"`` for a missing or unknown key,
        unsupported version or malformed cell.
    """
    try:
      if not isinstance(d, Mapping):
        raise GenotypeError(f"expected a JSON object with keys 'version', "
                            f"'normal', 'reduce', got {type(d).__name__}")
      if d.get("kind") == "blocks":  # block_genotype.KIND
        raise GenotypeError(
            "this is a block genotype (a ShuffleNet child of a DSNAS search), "
            "not a cell genotype: such a child keeps its search weights, "
            "export it with tfnas-export --run_dir=<its search run>")
      _check_keys(d, required=("version", "normal", "reduce"), optional=(),
                  where="")
      version = d["version"]
      if (isinstance(version, bool) or not isinstance(version, int)
          or version not in SUPPORTED_VERSIONS):
        raise GenotypeError(f"unsupported genotype version {version!r}; "
                            f"supported versions: {list(SUPPORTED_VERSIONS)}")
      cells = {}
      for name in _CELL_NAMES:
        cd = d[name]
        if not isinstance(cd, Mapping):
          raise GenotypeError(f"{name}: expected an object with keys 'nodes' "
                              f"and 'concat', got {cd!r}")
        _check_keys(cd, required=("nodes",), optional=("concat",),
                    where=f"{name}.")
        concat = cd.get("concat")
        if concat is not None and not _is_sequence(concat):
          raise GenotypeError(f"{name} concat: expected a list of node "
                              f"indices, got {concat!r}")
        cells[name] = CellGenotype(cd["nodes"], concat)
      genotype = cls(cells["normal"], cells["reduce"], version)
      if op_names is not None:
        genotype.validate(op_names)
      return genotype
    except GenotypeError as e:
      raise GenotypeError(f"{source}: {e}") from None

  def to_json(self, indent: int | None = 2) -> str:
    """Serialises to JSON text (see the module docstring for the format)."""
    return json.dumps(self.to_dict(), indent=indent)

  @classmethod
  def from_json(cls, s: str | bytes, source: str = "genotype",
                op_names: Iterable[str] | None = None) -> "Genotype":
    """Parses JSON text produced by :meth:`to_json`.

    Args:
      s: the JSON text.
      source: how to refer to the text in error messages.
      op_names: if given, also check that every op is one of these names.

    Returns:
      The genotype.

    Raises:
      GenotypeError: if the text is not valid JSON or not a valid genotype.
    """
    try:
      d = json.loads(s)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
      if isinstance(e, json.JSONDecodeError):
        # Some messages end in "at" already ("Unterminated string
        # starting at").
        at = "" if e.msg.endswith(" at") else " at"
        detail = f"{e.msg}{at} line {e.lineno} column {e.colno}"
      else:
        detail = ("nested too deeply" if isinstance(e, RecursionError) else
                  str(e))
      raise GenotypeError(f"{source}: not valid JSON ({detail}); the file "
                          f"may be truncated or not a genotype") from None
    return cls.from_dict(d, source=source, op_names=op_names)

  # -- files -----------------------------------------------------------------

  def save(self, path: str | os.PathLike) -> None:
    """Writes the genotype as JSON, atomically.

    The text goes to a temporary file in the same directory, which then
    replaces ``path`` with ``os.replace``, so readers never see a partial
    file.

    Args:
      path: destination file; its directory must exist.

    Raises:
      GenotypeError: if the genotype is invalid or the file cannot be written.
    """
    self.validate()
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    text = self.to_json() + "\n"
    tmp = None
    try:
      with tempfile.NamedTemporaryFile(
          "w", encoding="utf-8", dir=directory, delete=False,
          prefix="." + os.path.basename(path) + ".", suffix=".tmp") as f:
        tmp = f.name
        # A temp file is owner-only; the genotype gets the mode of a plainly
        # created file, readable like the rest of a (shared) run directory.
        os.chmod(tmp, new_file_mode())
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
      tmp = None
    except OSError as e:
      raise GenotypeError(f"{path}: cannot write genotype ({e.strerror or e}); "
                          f"check that the directory exists and is "
                          f"writable") from e
    finally:
      if tmp is not None:
        try:
          os.unlink(tmp)
        except OSError:
          pass

  @classmethod
  def load(cls, path: str | os.PathLike,
           op_names: Iterable[str] | None = None) -> "Genotype":
    """Reads a genotype written by :meth:`save`.

    Args:
      path: the JSON file.
      op_names: if given, also check that every op is one of these names.

    Returns:
      The genotype.

    Raises:
      GenotypeError: if the file is missing or unreadable, not valid JSON or
        not a valid genotype; the message starts with the path.
    """
    path = os.fspath(path)
    try:
      with open(path, "rb") as f:
        data = f.read()
    except FileNotFoundError:
      raise GenotypeError(f"{path}: genotype file not found; check the path "
                          f"(a search writes it after every epoch)") from None
    except OSError as e:
      raise GenotypeError(f"{path}: cannot read genotype file "
                          f"({e.strerror or e})") from None
    return cls.from_json(data, source=path, op_names=op_names)

  # -- published genotypes ---------------------------------------------------

  @classmethod
  def from_darts(cls, normal: Sequence[Sequence[Any]],
                 normal_concat: Iterable[int] | None,
                 reduce: Sequence[Sequence[Any]],
                 reduce_concat: Iterable[int] | None,
                 edges_per_node: int = 2) -> "Genotype":
    """Converts the classic DARTS flat genotype format.

    DARTS stores each cell as a flat list of ``(op, input)`` pairs,
    ``edges_per_node`` (2) consecutive pairs per intermediate node, e.g.
    ``normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ...]`` and
    ``normal_concat=range(2, 6)``.

    Args:
      normal: flat ``(op, input)`` list of the normal cell.
      normal_concat: node indices to concatenate (``None``: all
        intermediates).
      reduce: flat ``(op, input)`` list of the reduction cell.
      reduce_concat: as ``normal_concat`` for the reduction cell.
      edges_per_node: pairs per node in the flat list.

    Returns:
      The genotype.

    Raises:
      GenotypeError: if a list's length is not a multiple of
        ``edges_per_node``, an entry is not an ``(op, input)`` pair, or the
        result is invalid.
    """
    if (isinstance(edges_per_node, bool) or not isinstance(edges_per_node, int)
        or edges_per_node < 1):
      raise GenotypeError(f"edges_per_node must be an integer >= 1, got "
                          f"{edges_per_node!r}")
    cells = {}
    for name, flat, concat in (("normal", normal, normal_concat),
                               ("reduce", reduce, reduce_concat)):
      flat = list(flat)
      if not flat or len(flat) % edges_per_node:
        raise GenotypeError(
            f"darts {name}: has {len(flat)} (op, input) entries, expected a "
            f"positive multiple of edges_per_node={edges_per_node}")
      for k, entry in enumerate(flat):
        if not (_is_sequence(entry) and len(entry) == 2):
          raise GenotypeError(f"darts {name} entry {k}: expected an (op_name, "
                              f"input_index) pair, got {entry!r}")
      nodes = [tuple(tuple(e) for e in flat[k:k + edges_per_node])
               for k in range(0, len(flat), edges_per_node)]
      cells[name] = CellGenotype(
          nodes, None if concat is None else tuple(concat))
    return cls(cells["normal"], cells["reduce"])


def _check_keys(d: Mapping[str, Any], required: Sequence[str],
                optional: Sequence[str], where: str) -> None:
  for key in required:
    if key not in d:
      raise GenotypeError(f"missing key '{where}{key}'")
  allowed = set(required) | set(optional)
  for key in d:
    if key not in allowed:
      raise GenotypeError(f"unknown key '{where}{key}'; expected keys: "
                          f"{sorted(allowed)}")
