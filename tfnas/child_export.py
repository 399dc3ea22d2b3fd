"""Exporting a DSNAS search's child as a SavedModel, without retraining.

DSNAS (section 2.2) deploys the searched child with the weights it learned
during the search. `export_search_child` builds that child from a run
directory (`tfnas.child.load_search_child`: inherited weights, optional BN
recalibration) and hands it to the SavedModel exporter of
``tfnas.export``, which the export app (``tfnas-export``) also uses for
retrained networks. The metadata carries the keys a retrained export
writes where they apply (dataset, input shape, normalisation, parameters,
checkpoint and its epoch), so a serving client preprocesses both the same way.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from tfnas import data
from tfnas import export
from tfnas.child import evaluate_search_child, load_search_child
from tfnas.train.checkpointing import progress_metadata

SOURCE = "search child with inherited supernet weights (no retraining)"


@dataclasses.dataclass(frozen=True)
class ExportedChild:
  """What `export_search_child` wrote.

  Attributes:
    path: the version directory (``<base_path>/<version>``).
    genotype: the child's architecture (``Genotype`` or ``BlockGenotype``).
    metadata: the metadata given to the exporter (metadata.json holds it
      plus the serving signature, version and fingerprint).
  """
  path: str
  genotype: Any
  metadata: Mapping[str, Any]


def search_child_metadata(run_dir: str, info: Mapping[str, Any]
                          ) -> dict[str, Any]:
  """metadata.json facts of a child from `load_search_child`'s ``info``."""
  dataset = data.run_dataset_info(run_dir, info["dataset"])
  metadata = {
      "source": SOURCE,
      "dataset": info["dataset"],
      "num_classes": info["num_classes"],
      **dataset.input_metadata(),
      "input_shape": [info["image_size"], info["image_size"],
                      info["channels"]],
      "method": info["method"],
      "space": info["space"],
      "params": int(info["params"]),
      "flops": info["flops"],
      "flops_scope": info["flops_scope"],
      "checkpoint": os.path.abspath(info["checkpoint"]),
      "run_dir": os.path.abspath(run_dir),
      "bn_recalibration_batches": info["recalibrated_batches"],
  }
  metadata.update(progress_metadata(info["checkpoint"]))  # As a retrained.
  # Under the key (and type) of a retrained network's export, and counted
  # as there (`child.child_cost`).
  metadata["madds"] = int(round(info["madds"]))
  return metadata


def describe_flops(metadata: Mapping[str, Any]) -> str:
  """A child export's FLOPs in words: the count, what it covers and, where
  they differ (pooling edges), its multiply-adds."""
  text = f"{metadata['flops'] / 1e6:.4g}M FLOPs ({metadata['flops_scope']}"
  if metadata["madds"] != round(metadata["flops"]):
    text += f"; {metadata['madds'] / 1e6:.4g}M without them"
  return text + ")"


def export_search_child(run_dir: str, base_path: str, *,
                        recalibrate_batches: int = 0,
                        version: int | None = None,
                        data_dir: str | None = None,
                        checkpoint: str | None = None,
                        evaluate: bool = False,
                        unmeasured: str = "not asked for",
                        show_progress: bool = False,
                        allow_random_ops: bool = False,
                        dataset: str | None = None) -> ExportedChild:
  """Exports the inherited-weight child of the search in ``run_dir``.

  Args:
    run_dir: a search run directory (config.json, ckpt/).
    base_path: SavedModel base directory (versions below it).
    recalibrate_batches: re-estimate BN statistics on this many training
      batches first (0: keep the supernet's moving statistics).
    version: export version (the exporter's default if None).
    data_dir: tfds data directory for the recalibration batches.
    checkpoint: checkpoint prefix of the run to export (default: latest).
    evaluate: first measure the child as deployed on the search's
      evaluation split (`tfnas.child.evaluate_search_child`); the metadata
      gets ``val_acc``, ``val_loss``, ``val_split`` and ``val_examples``.
    unmeasured: without ``evaluate``, why the child was not measured; the
      metadata gets it as ``val_unmeasured`` in place of ``val_acc``.
    show_progress: draw a progress bar over the evaluation batches.
    allow_random_ops: export a child using an op that is random at
      inference (`tfnas.export.check_random_ops`).
    dataset: the run's dataset under another name (its npz file moved:
      the same content at another path); default: config.json's.

  Returns:
    An `ExportedChild` (export path, genotype, metadata).
  """
  child, genotype, info = load_search_child(
      run_dir, recalibrate_batches=recalibrate_batches, data_dir=data_dir,
      checkpoint=checkpoint, allow_random_ops=allow_random_ops,
      dataset=dataset)
  metadata = search_child_metadata(run_dir, info)
  if evaluate:
    measured = evaluate_search_child(child, run_dir, data_dir=data_dir,
                                     show_progress=show_progress,
                                     dataset=dataset)
    metadata.update(val_acc=measured["val/acc"],
                    val_loss=measured["val/loss"],
                    val_split=measured["split"],
                    val_examples=measured["examples"])
  else:
    metadata["val_unmeasured"] = unmeasured
  path = export.export_saved_model(child, base_path, metadata=metadata,
                                   genotype=genotype, version=version,
                                   allow_random_ops=allow_random_ops)
  return ExportedChild(path, genotype, metadata)
