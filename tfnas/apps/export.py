"""tfnas-export: SavedModel of a retrained network or a DSNAS child, for TF
Serving.

    tfnas-export --run_dir=runs/train_digits --export_dir=exports/digits
    tfnas-export --checkpoint=runs/train_digits/ckpt/ckpt-230 \\
        --export_dir=exports/digits --version=2
    tfnas-export --run_dir=runs/dsnas_digits --export_dir=exports/dsnas \\
        --recalibrate_batches=20

A retraining run (tfnas-train): rebuilds the derived network from the run
directory (config.json and genotype.json) and restores the latest checkpoint
(or --checkpoint). A search run of a method whose child is deployed with
its search weights (DSNAS, section 2.2: no retraining): rebuilds the
supernet and α from the checkpoint, takes the argmax child with inherited
weights (``tfnas.child_export``), optionally re-estimating its BN statistics
on --recalibrate_batches training batches, and measures it as deployed on
the search's evaluation split (--evaluate). Either way it writes
``<export_dir>/<version>/`` with the ``serving_default`` signature (see
``tfnas.export`` for the input contract), genotype.json and metadata.json.
Other search runs (DARTS, SNAS) are refused: their supernet is never
exported; retrain their genotype first.
"""

from __future__ import annotations

import os
import signal

from absl import flags
from absl import logging

from tfnas import dataset_names
from tfnas import flags as tfnas_flags
from tfnas.apps import common
from tfnas.apps import startup
from tfnas.errors import TfnasError
from tfnas.genotype import Genotype
from tfnas.train import rundir

flags.DEFINE_string("run_dir", None,
                    "Retraining run directory (tfnas-train --run_dir) or a "
                    "DSNAS search run directory (tfnas-search --run_dir).")
flags.DEFINE_string("checkpoint", None,
                    "Checkpoint prefix to export (e.g. <run_dir>/ckpt/ckpt-"
                    "230, or one of its files), or a run or ckpt folder "
                    "(its latest); default: the latest checkpoint of "
                    "--run_dir.")
flags.DEFINE_string("export_dir", None,
                    "TF Serving model base path; the model goes to "
                    "<export_dir>/<version>/.")
flags.DEFINE_integer("version", 0,
                     "Version directory number (0: one above the highest "
                     "existing version, or that version when it already "
                     "holds this model).")
flags.DEFINE_integer("recalibrate_batches", 0,
                     "DSNAS search runs only: re-estimate the child's BN "
                     "statistics on this many training batches before "
                     "exporting (0: keep the supernet's moving averages, "
                     "which mix every child sampled in the search).")
flags.DEFINE_string("data_dir", None,
                    "DSNAS search runs: tfds data directory of the data for "
                    "--recalibrate_batches and --evaluate (default: the "
                    "search run's --data_dir).")
flags.DEFINE_string("dataset", None,
                    "A run on an npz file: that file where it is now "
                    "(npz:PATH, the same bytes at another path), for a DSNAS "
                    "child's --evaluate and --recalibrate_batches, and for "
                    "runs without dataset.json (default: where the run "
                    "read it).")
flags.DEFINE_boolean("evaluate", True,
                     "DSNAS search runs only: measure the child as deployed "
                     "(its moving or re-estimated BN statistics) on the "
                     "search's evaluation split before exporting; printed "
                     "and written to metadata.json as val_acc. The search's "
                     "own val/child_acc uses batch statistics. Where the "
                     "search's npz data file is gone, the default skips the "
                     "measurement with a warning, and --evaluate given on "
                     "the command line or in a flagfile is refused.")
flags.DEFINE_boolean("progress", True,
                     "Show a progress bar over the evaluation batches.")
flags.DEFINE_boolean("allow_random_ops", False,
                     "Export a genotype that uses an op whose output is "
                     "random at inference too (the S4 space's noise): the "
                     "model then answers the same input differently each "
                     "time. Refused without this flag.")
FLAGS = flags.FLAGS


def _read_run_config(run_dir: str) -> dict:
  """config.json of a run directory, as saved (a search or a retraining)."""
  path = os.path.join(run_dir, "config.json")
  if not os.path.exists(path):
    raise TfnasError(f"{path} not found; --run_dir must be a tfnas-train or "
                     f"a DSNAS tfnas-search run directory")
  return rundir.read_config(run_dir)


def _ignore_stop_signals() -> None:
  """Once the version is in place, Ctrl-C and SIGTERM are ignored: one that
  arrives while the summary prints or TensorFlow tears down would report a
  complete export as interrupted (status 130 or 143)."""
  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, signal.SIG_IGN)


def _signature_line(checkpoint_path: str, path: str, input_shape,
                    before: dict[int, str]) -> str:
  """What was exported where; ``before``: `export.exported_versions` before
  the export (a version that held this model already was not written)."""
  if int(os.path.basename(path)) in before:
    head = (f"{path} already holds this model ({checkpoint_path}); nothing "
            f"written")
  else:
    head = f"exported {checkpoint_path} to {path}"
  return (f"{head} (signature serving_default: "
          f"images float32 [batch, {', '.join(map(str, input_shape))}] in "
          f"[0, 255] -> logits, probabilities)")


def _progress(metadata: dict) -> tuple[int, int] | None:
  """(epoch, step in epoch) of an export's checkpoint; None when unknown."""
  epoch, step = metadata.get("epoch"), metadata.get("step_in_epoch") or 0
  if not isinstance(epoch, int) or not isinstance(step, int):
    return None
  return epoch, step


def _warn_if_older_than_served(path: str, metadata: dict,
                               before: dict[int, str]) -> None:
  """Warns when ``path``, a version just written (not in ``before``,
  `export.exported_versions` before the export) and now the highest (the
  one TF Serving serves by default), holds an earlier checkpoint of the
  same run (its checkpoints' folder) than a lower version does."""
  from tfnas import export
  base, version = os.path.split(path)
  versions = export.existing_versions(base)
  mine = _progress(metadata)
  if (mine is None or int(version) in before or
      int(version) != max(versions)):
    return
  run = os.path.dirname(os.path.dirname(metadata["checkpoint"]))
  later = []
  for other in versions[:-1]:
    found = export.version_metadata(os.path.join(base, str(other))) or {}
    checkpoint, progress = found.get("checkpoint"), _progress(found)
    if (isinstance(checkpoint, str) and progress is not None and
        os.path.dirname(os.path.dirname(checkpoint)) == run and
        progress > mine):
      later.append((progress, other))
  if later:
    (epoch, _), other = max(later)
    logging.warning(
        "version %s holds an earlier checkpoint of %s (epoch %d) than "
        "version %d (epoch %d), and TF Serving serves the highest version by "
        "default; delete %s if that is not meant", version, run, mine[0],
        other, epoch, path)


def _run_dataset(run_dir: str, saved: str) -> str:
  """The run's dataset as this export reads it: ``saved`` (config.json's),
  or --dataset, the same npz content at another path; refuses an npz file
  that the export must read but cannot (the run has no usable
  dataset.json, and the file is not there as the run read it)."""
  dataset = saved if FLAGS.dataset in (None, saved) else _moved(saved)
  if dataset_names.fingerprint_of(dataset) is None:
    return dataset
  from tfnas import data
  if data.recorded_info(run_dir, dataset) is not None:
    return dataset  # The file is read only for images (`_measure_child`).
  state = dataset_names.file_state(dataset)
  if state == "same":
    return dataset
  record = os.path.join(run_dir, data.DATASET_RECORD)
  why = ("keeps no dataset.json (written before runs kept one)"
         if not os.path.isfile(record) else
         "has a dataset.json that cannot be used (see the warning above)")
  raise TfnasError(f"{run_dir} {why}, so its export reads the run's data "
                   f"file, but {_file_problem(dataset, state)}")


def _file_state(dataset: str, state: str) -> str:
  """``PATH is not there`` (or another of `dataset_names.FILE_STATES`)."""
  return (f"{dataset_names.file_path(dataset)} "
          f"{dataset_names.FILE_STATES[state]}")


def _file_problem(dataset: str, state: str) -> str:
  """What is wrong with the run's npz file, and how to mend it."""
  return (f"its data file {_file_state(dataset, state)}; put back the file "
          "the run used, or name where it is now with --dataset=npz:PATH")


def _moved(saved: str) -> str:
  """--dataset as the run's npz data file at another path (its saved
  name), or why not."""
  fingerprint = dataset_names.fingerprint_of(saved)
  if fingerprint is None:
    raise TfnasError(f"--dataset names where a run's npz data file is now; "
                     f"this run is on --dataset={saved} (drop --dataset)")
  if not dataset_names.is_npz_name(FLAGS.dataset):
    raise TfnasError(f"--dataset={FLAGS.dataset}: give the run's npz data "
                     f"file where it is now, as npz:PATH")
  if not os.path.isfile(dataset_names.file_path(FLAGS.dataset)):
    raise TfnasError(f"--dataset={FLAGS.dataset}: "
                     f"{dataset_names.file_path(FLAGS.dataset)} is not a file")
  given = tfnas_flags.dataset_name(FLAGS.dataset)  # As a run saves it.
  if dataset_names.fingerprint_of(given) != fingerprint:
    raise TfnasError(
        f"--dataset={FLAGS.dataset} holds other data than the run's "
        f"{dataset_names.file_path(saved)} (content sha256 {fingerprint}..., "
        f"this file {dataset_names.fingerprint_of(given)}...; the bytes must "
        "be the same)")
  return given


def _measure_child(dataset: str) -> tuple[bool, str]:
  """Whether a search child is measured (--evaluate), and if not why (for
  metadata.json's ``val_unmeasured``), after checking that the search's npz
  data file is there as the search read it for what reads its images: the
  evaluation split (--evaluate: left out with a warning when the file is
  gone, unless asked for by name) and the training split
  (--recalibrate_batches: refused). Call after `_run_dataset`."""
  asked = (True, "") if FLAGS.evaluate else (False, "exported with "
                                             "--noevaluate")
  if not (FLAGS.evaluate or FLAGS.recalibrate_batches):
    return asked
  if dataset_names.fingerprint_of(dataset) is None:
    return asked
  state = dataset_names.file_state(dataset)
  if state == "same":
    return asked
  problem = _file_problem(dataset, state)
  if FLAGS.recalibrate_batches:
    raise TfnasError(f"--recalibrate_batches reads the search's training "
                     f"images, but {problem}, or export with "
                     f"--recalibrate_batches=0")
  if state == "absent" and not FLAGS["evaluate"].present:
    logging.warning("the child is exported without measuring it on the "
                    "search's evaluation split: %s (--noevaluate says this "
                    "is meant)", problem)
    return False, f"{_file_state(dataset, state)} at export"
  raise TfnasError(f"--evaluate measures the child on the search's data, but "
                   f"{problem}, or export with --noevaluate")


def _export_search_child(run_dir: str, method_name: str, dataset: str,
                         checkpoint_path: str | None) -> None:
  """Exports the inherited-weight child of a search run, or says why not."""
  startup.import_tensorflow()  # Quietly, before tfnas.methods loads it.
  from tfnas import methods
  method = methods.get_method(method_name)
  if not method.deploys_search_weights:
    deployable = sorted(m.name for m in methods.METHODS.values()
                        if m.deploys_search_weights)
    raise TfnasError(f"{run_dir} is a {method.name} search run: its supernet "
                     f"is never exported; retrain the derived cell first "
                     f"with tfnas-train --genotype={run_dir} (only "
                     f"{', '.join(deployable)} children deploy with their "
                     f"search weights)")
  dataset = _run_dataset(run_dir, dataset)
  evaluate, unmeasured = _measure_child(dataset)
  from tfnas import child_export
  from tfnas import export
  before = export.exported_versions(FLAGS.export_dir)
  exported = child_export.export_search_child(
      run_dir, FLAGS.export_dir,
      recalibrate_batches=FLAGS.recalibrate_batches,
      version=FLAGS.version or None, checkpoint=checkpoint_path,
      data_dir=FLAGS.data_dir, evaluate=evaluate, unmeasured=unmeasured,
      show_progress=FLAGS.progress, allow_random_ops=FLAGS.allow_random_ops,
      dataset=dataset)
  _ignore_stop_signals()
  meta = exported.metadata
  used = meta["bn_recalibration_batches"]
  bn = (f"BN statistics re-estimated on {used} training batches" if used
        else "the supernet's BN statistics")
  print(exported.genotype)
  if isinstance(exported.genotype, Genotype):  # A cell-space child.
    # Its `none` edges are dropped edges, not worth a warning; input-less
    # nodes and input-independent cells are.
    for problem in exported.genotype.warnings(none_edges=False):
      logging.warning("genotype: %s", problem)
  print(f"{meta['method']} child of {run_dir} ({meta['space']} space, "
        f"inherited weights, {bn}): {meta['params'] / 1e6:.3f}M "
        f"parameters, {child_export.describe_flops(meta)}")
  if "val_acc" in meta:
    print(f"deployed child on the {meta['val_split']} split "
          f"({meta['val_examples']} examples): val/acc {meta['val_acc']:.4f}, "
          f"val/loss {meta['val_loss']:.4f}")
  else:
    print(f"deployed child not measured: {meta['val_unmeasured']}")
  _warn_if_older_than_served(exported.path, meta, before)
  print(_signature_line(meta["checkpoint"], exported.path,
                        meta["input_shape"], before))


def _export_retrained(run_dir: str, saved: dict,
                      checkpoint_path: str | None) -> None:
  """Exports the network of a tfnas-train run (latest or given checkpoint)."""
  if FLAGS.recalibrate_batches:
    raise TfnasError(f"--recalibrate_batches applies to DSNAS search children "
                     f"only; {run_dir} is a retraining run, whose BN "
                     f"statistics were estimated on its own network")
  from tfnas.config import TrainConfig  # Light: no TensorFlow.
  config = TrainConfig.from_dict(saved)
  if checkpoint_path is None and not common.holds_checkpoints(
      os.path.join(run_dir, "ckpt")):
    # A run stopped before its first checkpoint may not have written its
    # genotype.json either: the missing checkpoint is what to say.
    raise TfnasError(f"{run_dir}/ckpt holds no checkpoint yet; train first "
                     "or pass --checkpoint")
  from tfnas.genotype import Genotype
  genotype = Genotype.load(os.path.join(run_dir, "genotype.json"))
  startup.import_tensorflow()  # Quietly, before tfnas modules load it.
  from tfnas import cost, data, export, models
  from tfnas.train.checkpointing import resolve_checkpoint, restore_problem
  export.check_random_ops(genotype, FLAGS.allow_random_ops)
  checkpoint_path = resolve_checkpoint(run_dir, checkpoint_path,
                                       "train first or pass --checkpoint")
  dataset = _run_dataset(run_dir, config.dataset)
  info = data.run_dataset_info(run_dir, dataset)
  # The auxiliary head is a training aid: not built, not exported.
  network = models.build_network(config.network, genotype, info.input_shape,
                                 info.num_classes, config.num_cells,
                                 config.channels, auxiliary=False)
  problem = restore_problem(checkpoint_path, network=network)
  if problem is not None:
    raise TfnasError(f"checkpoint {checkpoint_path} does not hold the "
                     f"network described by {run_dir}/config.json and "
                     f"genotype.json ({problem}); nothing was exported")
  network_cost = cost.network_cost(genotype, config.network, info.input_shape,
                                   info.num_classes, config.num_cells,
                                   config.channels)
  metadata = {
      "dataset": dataset, "num_classes": info.num_classes,
      **info.input_metadata(), "network": config.network,
      "num_cells": config.num_cells, "channels": config.channels,
      "params": network_cost.params, "madds": network_cost.madds,
      "checkpoint": os.path.abspath(checkpoint_path),
      **_checkpoint_metrics(run_dir, checkpoint_path),
  }
  before = export.exported_versions(FLAGS.export_dir)
  path = export.export_saved_model(network, FLAGS.export_dir,
                                   metadata=metadata, genotype=genotype,
                                   version=FLAGS.version or None,
                                   allow_random_ops=FLAGS.allow_random_ops)
  _ignore_stop_signals()
  print(f"{config.network} network, {config.num_cells} cells, "
        f"C={config.channels}: {network_cost.params / 1e6:.3f}M parameters, "
        f"{network_cost.madds / 1e6:.1f}M multiply-adds per image")
  _warn_if_older_than_served(path, metadata, before)
  print(_signature_line(metadata["checkpoint"], path, info.input_shape,
                        before))


def _checkpoint_metrics(run_dir: str, checkpoint_path: str) -> dict:
  """`checkpointing.progress_metadata` and the ``val_acc`` that the
  checkpoint's epoch logged in history.jsonl (None for a checkpoint written
  mid-epoch: it was never evaluated)."""
  from tfnas.train.checkpointing import progress_metadata
  found = progress_metadata(checkpoint_path)
  epoch = found["epoch"]
  ended = epoch is not None and "step_in_epoch" not in found
  return {**found, "val_acc": (rundir.epoch_history(run_dir, epoch).get(
      "val/acc") if ended else None)}


@common.clean_errors("tfnas-export")
def main(argv):
  del argv  # run_app refuses positional arguments.
  if not FLAGS.export_dir:
    raise TfnasError("--export_dir is required (the TF Serving model base "
                     "path)")
  if rundir.has_run(FLAGS.export_dir):
    raise TfnasError(f"--export_dir={FLAGS.export_dir} holds a tfnas run; "
                     "give the model a folder of its own (TF Serving reads "
                     "every numbered folder there as a version)")
  if FLAGS.version < 0:
    raise TfnasError(f"invalid --version={FLAGS.version}; use 0 for the next "
                     f"version or a positive number")
  if FLAGS.recalibrate_batches < 0:
    raise TfnasError(f"invalid --recalibrate_batches="
                     f"{FLAGS.recalibrate_batches}; use 0 to keep the BN "
                     f"statistics or a positive number of batches")
  checkpoint_path = FLAGS.checkpoint
  run_dir = FLAGS.run_dir
  if checkpoint_path and os.path.isdir(checkpoint_path):
    # A folder: a run directory, or its ckpt/ folder; the latest checkpoint.
    folder = os.path.abspath(checkpoint_path)
    folder_run = (os.path.dirname(folder) if common.holds_checkpoints(folder)
                  else folder)
    if run_dir is not None and (os.path.realpath(run_dir) !=
                                os.path.realpath(folder_run)):
      raise TfnasError(f"--checkpoint={checkpoint_path} is a folder of "
                       f"another run than --run_dir={run_dir}; give one of "
                       "them")
    run_dir, checkpoint_path = folder_run, None
  elif checkpoint_path and run_dir is not None:
    # <run>/ckpt/ckpt-N of a run directory other than --run_dir: which
    # run's network is meant? (A prefix outside any run directory, e.g. a
    # copied checkpoint, is restored into --run_dir's network.)
    owner = os.path.dirname(os.path.dirname(os.path.abspath(
        checkpoint_path)))
    if (os.path.isfile(os.path.join(owner, "config.json")) and
        not (os.path.isdir(run_dir) and os.path.samefile(owner, run_dir))):
      raise TfnasError(f"--checkpoint={checkpoint_path} is a checkpoint of "
                       f"another run ({owner}) than --run_dir={run_dir}; "
                       "give one of them")
  if run_dir is None:
    if not checkpoint_path:
      raise TfnasError("give --run_dir (latest checkpoint) or --checkpoint")
    # Named before its run directory is derived from it.
    startup.import_tensorflow()
    from tfnas.train.checkpointing import checkpoint_prefix
    checkpoint_prefix(checkpoint_path)
    # <run_dir>/ckpt/ckpt-N
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(
        checkpoint_path)))
  saved = _read_run_config(run_dir)
  if rundir.run_kind(saved) == "tfnas-search":
    _export_search_child(run_dir, saved["method"], saved.get("dataset"),
                         checkpoint_path)
  else:
    _export_retrained(run_dir, saved, checkpoint_path)


def run():
  common.run_app(main, __doc__, __name__)


if __name__ == "__main__":
  run()
