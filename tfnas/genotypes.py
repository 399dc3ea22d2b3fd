"""Published genotypes by name, and resolving ``--genotype`` values.

``--genotype`` accepts a registered name (``DARTS_V2``), a genotype JSON file
(``runs/snas_digits/genotype.json``) or a run directory holding one. A file
may also hold a cell pair in the DARTS code's own forms, as papers and
repositories print them: the ``Genotype(normal=[('sep_conv_3x3', 0), ...],
normal_concat=range(2, 6), reduce=[...], reduce_concat=...)`` text, or the
same fields as a JSON object (two edges per node, in order).

Registered cells (DARTS op names, inputs 0/1 = cells k-2/k-1):

* ``DARTS_V1`` / ``DARTS_V2`` -- DARTS first / second order on CIFAR-10
  (DARTS paper, fig. 4-5; 3.3M parameters at 20 cells, C = 36).
  ``DARTS`` is an alias of ``DARTS_V2``, the cell DARTS retrains.
* ``NASNet`` -- NASNet-A as expressed in the DARTS op set (5 nodes; the
  reduction cell concatenates only the unused nodes 4, 5, 6).

The cells of SNAS, DSNAS, UNAS, DARTS-PT and Amended-DARTS are printed only
as figures in the papers (their text is not recoverable from the copies in
this workspace), so they are not registered; a genotype.json written by a
tfnas search is the way to retrain such a cell.
"""

from __future__ import annotations

import ast
import json
import os

from tfnas import ops
from tfnas.genotype import Genotype, GenotypeError

_DARTS_V1 = Genotype.from_darts(
    normal=[("sep_conv_3x3", 1), ("sep_conv_3x3", 0),
            ("skip_connect", 0), ("sep_conv_3x3", 1),
            ("skip_connect", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 0), ("skip_connect", 2)],
    normal_concat=range(2, 6),
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1),
            ("skip_connect", 2), ("max_pool_3x3", 0),
            ("max_pool_3x3", 0), ("skip_connect", 2),
            ("skip_connect", 2), ("avg_pool_3x3", 0)],
    reduce_concat=range(2, 6))

_DARTS_V2 = Genotype.from_darts(
    normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("skip_connect", 0),
            ("skip_connect", 0), ("dil_conv_3x3", 2)],
    normal_concat=range(2, 6),
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1),
            ("skip_connect", 2), ("max_pool_3x3", 1),
            ("max_pool_3x3", 0), ("skip_connect", 2),
            ("skip_connect", 2), ("max_pool_3x3", 1)],
    reduce_concat=range(2, 6))

_NASNET = Genotype.from_darts(
    normal=[("sep_conv_5x5", 1), ("sep_conv_3x3", 0),
            ("sep_conv_5x5", 0), ("sep_conv_3x3", 0),
            ("avg_pool_3x3", 1), ("skip_connect", 0),
            ("avg_pool_3x3", 0), ("avg_pool_3x3", 0),
            ("sep_conv_3x3", 1), ("skip_connect", 1)],
    normal_concat=range(2, 7),
    reduce=[("sep_conv_5x5", 1), ("sep_conv_7x7", 0),
            ("max_pool_3x3", 1), ("sep_conv_7x7", 0),
            ("avg_pool_3x3", 1), ("sep_conv_5x5", 0),
            ("skip_connect", 3), ("avg_pool_3x3", 2),
            ("sep_conv_3x3", 2), ("max_pool_3x3", 1)],
    reduce_concat=(4, 5, 6))

PUBLISHED: dict[str, Genotype] = {
    "DARTS_V1": _DARTS_V1,
    "DARTS_V2": _DARTS_V2,
    "DARTS": _DARTS_V2,
    "NASNet": _NASNET,
}


def resolve(spec: str) -> Genotype:
  """The genotype named or pointed to by ``spec``.

  Args:
    spec: a key of :data:`PUBLISHED`, a genotype JSON file, or a directory
      containing ``genotype.json`` (a search or retrain run directory).

  Returns:
    The genotype, with every op checked against the op registry.

  Raises:
    GenotypeError: unknown name (listing the known ones), missing or
      malformed file, unknown op.
  """
  if spec in PUBLISHED:
    return PUBLISHED[spec]
  path = spec
  if os.path.isdir(path):
    path = os.path.join(path, "genotype.json")
  elif not (os.path.exists(path) or path.endswith(".json")
            or os.sep in path):
    same = [name for name in PUBLISHED if name.lower() == spec.lower()]
    hint = f" (names are case-sensitive: {same[0]})" if same else ""
    raise GenotypeError(
        f"unknown genotype {spec!r}{hint}; known names: "
        f"{', '.join(sorted(PUBLISHED))}, or give a genotype.json path or "
        f"a run directory")
  try:
    return Genotype.load(path, op_names=ops.OPS)
  except GenotypeError as e:
    error = e
  try:
    darts = _darts_form(path)
    if darts is not None:
      genotype = Genotype.from_darts(
          darts["normal"], darts.get("normal_concat"), darts["reduce"],
          darts.get("reduce_concat"))
      genotype.validate(ops.OPS)
      return genotype
  except (GenotypeError, TypeError) as e:
    raise GenotypeError(f"{path}: DARTS genotype: {e}") from None
  if not os.path.isfile(path):
    raise error
  raise GenotypeError(f"{error} (see README.md, 'Genotype files', for the "
                      f"format)") from None


_DARTS_FIELDS = ("normal", "normal_concat", "reduce", "reduce_concat")
_MAX_RANGE = 64  # Nodes a concat range may name (a cell has a handful).


def _darts_form(path: str) -> dict | None:
  """The fields of a DARTS-code genotype in the file ``path`` (its
  ``Genotype(...)`` text or a JSON object of its fields: lists, not
  tfnas' per-node objects), or None when the file holds neither.

  Raises:
    GenotypeError: a ``range`` too long for a cell.
  """
  try:
    with open(path, encoding="utf-8-sig") as f:
      text = f.read().strip()
  except (OSError, UnicodeDecodeError):
    return None
  try:
    fields = json.loads(text)
  except RecursionError:
    return None
  except ValueError:
    fields = _darts_text(text)
  if (not isinstance(fields, dict) or not set(fields) <= set(_DARTS_FIELDS)
      or not {"normal", "reduce"} <= set(fields)):
    return None
  # Ordered sequences only: tfnas' own per-cell objects are not this form,
  # and a set literal would order its edges differently on every run.
  if not all(isinstance(v, (list, tuple)) or (v is None and k.endswith(
      "_concat")) for k, v in fields.items()):
    return None
  return fields


def _darts_text(text: str) -> dict | None:
  """The keyword arguments of a ``Genotype(...)`` call whose values are
  literals or ``range(...)`` of literals; None otherwise.

  Raises:
    GenotypeError: a ``range`` of more than ``_MAX_RANGE`` nodes.
  """
  try:
    call = ast.parse(text, mode="eval").body
  except (SyntaxError, ValueError, RecursionError, MemoryError):
    return None
  if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and
          call.func.id == "Genotype" and not call.args):
    return None
  fields = {}
  for keyword in call.keywords:
    value = keyword.value
    is_range = (isinstance(value, ast.Call) and
                isinstance(value.func, ast.Name) and
                value.func.id == "range" and not value.keywords)
    try:
      if is_range:
        nodes = range(*(ast.literal_eval(a) for a in value.args))
        size = len(nodes)
      else:
        nodes = ast.literal_eval(value)
    except (ValueError, TypeError, SyntaxError, RecursionError,
            OverflowError):
      return None
    if is_range:
      if size > _MAX_RANGE:
        raise GenotypeError(f"{keyword.arg}={nodes!r} names {size} nodes; "
                            f"a cell has at most {_MAX_RANGE}")
      nodes = list(nodes)
    fields[keyword.arg] = nodes
  return fields