"""Published genotypes by name, and resolving ``--genotype`` values.

``--genotype`` accepts a registered name (``DARTS_V2``), a genotype JSON file
(``runs/snas_digits/genotype.json``) or a run directory holding one.

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
    raise GenotypeError(
        f"unknown genotype {spec!r}; known names: "
        f"{', '.join(sorted(PUBLISHED))}, or give a genotype.json path or "
        f"a run directory")
  return Genotype.load(path, op_names=ops.OPS)
