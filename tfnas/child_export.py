"""Exporting a DSNAS search's child as a SavedModel, without retraining.

DSNAS (section 2.2) deploys the searched child with the weights it learned
during the search. `export_search_child` builds that child from a run
directory (`tfnas.child.load_search_child`: inherited weights, optional BN
recalibration) and hands it to the SavedModel exporter of
``tfnas.export`` (``export_saved_model(model, base_path, *, metadata,
genotype=None, version=None)``), which the export app (``tfnas-export``)
also uses for retrained networks.
"""

from __future__ import annotations

from tfnas.errors import TfnasError


def export_search_child(run_dir: str, base_path: str, *,
                        recalibrate_batches: int = 0,
                        version: int | None = None,
                        data_dir: str | None = None):
  """Exports the inherited-weight child of the search in ``run_dir``.

  Args:
    run_dir: a search run directory (config.json, ckpt/).
    base_path: SavedModel base directory (versions below it).
    recalibrate_batches: re-estimate BN statistics on this many training
      batches first (0: keep the supernet's moving statistics).
    version: export version (the exporter's default if None).
    data_dir: tfds data directory for the recalibration batches.

  Returns:
    Whatever ``tfnas.export.export_saved_model`` returns (the export path).
  """
  try:
    from tfnas import export  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise TfnasError("tfnas.export (the SavedModel exporter) is not "
                     "available in this installation") from e
  from tfnas.child import load_search_child
  child, genotype, info = load_search_child(
      run_dir, recalibrate_batches=recalibrate_batches, data_dir=data_dir)
  metadata = {
      "source": "search child with inherited supernet weights (no "
                "retraining)",
      "run_dir": run_dir,
      "checkpoint": info["checkpoint"],
      "params": info["params"],
      "flops": info["flops"],
      "bn_recalibration_batches": recalibrate_batches,
      "image_size": info["image_size"],
      "channels": info["channels"],
      "num_classes": info["num_classes"],
  }
  return export.export_saved_model(child, base_path, metadata=metadata,
                                   genotype=genotype, version=version)
