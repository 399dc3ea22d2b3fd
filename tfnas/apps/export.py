"""tfnas-export: SavedModel of a retrained network, for TF Serving.

    tfnas-export --run_dir=runs/train_digits --export_dir=exports/digits
    tfnas-export --checkpoint=runs/train_digits/ckpt/ckpt-230 \\
        --export_dir=exports/digits --version=2

Rebuilds the derived network from the run directory (config.json and
genotype.json), restores the latest checkpoint (or --checkpoint), and writes
``<export_dir>/<version>/`` with the ``serving_default`` signature (see
``tfnas.export`` for the input contract), genotype.json and metadata.json.
A search run directory is refused: the supernet is never exported.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags

from tfnas.apps import common
from tfnas.errors import TfnasError

flags.DEFINE_string("run_dir", None,
                    "Retraining run directory (tfnas-train --run_dir).")
flags.DEFINE_string("checkpoint", None,
                    "Checkpoint prefix to export (e.g. <run_dir>/ckpt/ckpt-"
                    "230); default: the latest checkpoint of --run_dir.")
flags.DEFINE_string("export_dir", None,
                    "TF Serving model base path; the model goes to "
                    "<export_dir>/<version>/.")
flags.DEFINE_integer("version", 0,
                     "Version directory number (0: one above the highest "
                     "existing version).")
FLAGS = flags.FLAGS


def _read_run_config(run_dir: str):
  from tfnas.config import TrainConfig  # Light: no TensorFlow.
  path = os.path.join(run_dir, "config.json")
  try:
    with open(path) as f:
      saved = json.load(f)
  except FileNotFoundError:
    raise TfnasError(f"{path} not found; --run_dir must be a tfnas-train run "
                     f"directory") from None
  except (OSError, ValueError) as e:
    raise TfnasError(f"cannot read {path} ({e})") from None
  if "method" in saved:
    raise TfnasError(f"{run_dir} is a search run: its supernet is never "
                     f"exported; retrain the derived cell first with "
                     f"tfnas-train --genotype={run_dir}")
  return TrainConfig.from_dict(saved)


def _last_history(run_dir: str) -> dict:
  try:
    with open(os.path.join(run_dir, "history.jsonl")) as f:
      lines = [line for line in f if line.strip()]
    return json.loads(lines[-1]) if lines else {}
  except (OSError, ValueError):
    return {}


@common.clean_errors("tfnas-export")
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.export_dir:
    raise TfnasError("--export_dir is required (the TF Serving model base "
                     "path)")
  if FLAGS.version < 0:
    raise TfnasError(f"invalid --version={FLAGS.version}; use 0 for the next "
                     f"version or a positive number")
  checkpoint_path = FLAGS.checkpoint
  run_dir = FLAGS.run_dir
  if run_dir is None:
    if not checkpoint_path:
      raise TfnasError("give --run_dir (latest checkpoint) or --checkpoint")
    # <run_dir>/ckpt/ckpt-N
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(
        checkpoint_path)))
  config = _read_run_config(run_dir)
  from tfnas.genotype import Genotype
  genotype = Genotype.load(os.path.join(run_dir, "genotype.json"))
  tf = common.import_tensorflow()
  from tfnas import cost, data, export, models
  if checkpoint_path is None:
    checkpoint_path = tf.train.latest_checkpoint(os.path.join(run_dir, "ckpt"))
    if checkpoint_path is None:
      raise TfnasError(f"{run_dir}/ckpt holds no checkpoint yet; train first "
                       f"or pass --checkpoint")
  elif not tf.io.gfile.exists(checkpoint_path + ".index"):
    raise TfnasError(f"checkpoint {checkpoint_path} not found (no "
                     f"{os.path.basename(checkpoint_path)}.index)")
  info = data.dataset_info(config.dataset)
  # The auxiliary head is a training aid: not built, not exported.
  network = models.build_network(config.network, genotype, info.input_shape,
                                 info.num_classes, config.num_cells,
                                 config.channels, auxiliary=False)
  status = tf.train.Checkpoint(network=network).restore(checkpoint_path)
  try:
    status.expect_partial().assert_existing_objects_matched()
  except AssertionError as e:
    first = str(e).split(":")[0]
    raise TfnasError(f"checkpoint {checkpoint_path} does not hold the "
                     f"network described by {run_dir}/config.json and "
                     f"genotype.json ({first}); nothing was exported") from None
  network_cost = cost.network_cost(genotype, config.network, info.input_shape,
                                   info.num_classes, config.num_cells,
                                   config.channels)
  history = _last_history(run_dir)
  metadata = {
      "dataset": config.dataset, "num_classes": info.num_classes,
      "input_shape": list(info.input_shape), "mean": list(info.mean),
      "std": list(info.std), "network": config.network,
      "num_cells": config.num_cells, "channels": config.channels,
      "params": network_cost.params, "madds": network_cost.madds,
      "checkpoint": os.path.abspath(checkpoint_path),
      "val_acc": history.get("val/acc"), "epoch": history.get("epoch"),
  }
  path = export.export_saved_model(network, FLAGS.export_dir,
                                   metadata=metadata, genotype=genotype,
                                   version=FLAGS.version or None)
  print(f"{config.network} network, {config.num_cells} cells, "
        f"C={config.channels}: {network_cost.params / 1e6:.3f}M parameters, "
        f"{network_cost.madds / 1e6:.1f}M multiply-adds per image")
  print(f"exported {checkpoint_path} to {path} (signature serving_default: "
        f"images float32 [batch, {', '.join(map(str, info.input_shape))}] in "
        f"[0, 255] -> logits, probabilities)")


def run():
  app.run(main)


if __name__ == "__main__":
  run()
