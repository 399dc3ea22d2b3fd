"""tfnas-train: retrain a derived network from scratch.

    tfnas-train --flagfile=flags/train_digits.cfg
    tfnas-train --flagfile=flags/train_cifar10.cfg --genotype=runs/x

Writes config.json, genotype.json, checkpoints (ckpt/), TensorBoard events
(tb/) and history.jsonl into --run_dir; ``tfnas-export --run_dir=...`` turns
the result into a SavedModel for TF Serving.
"""

from __future__ import annotations

from absl import logging

from tfnas import flags as tfnas_flags
from tfnas.apps import common
from tfnas.apps import startup
from tfnas.config import TrainConfig

tfnas_flags.define_run_flags(TrainConfig())
tfnas_flags.define_data_flags(TrainConfig())
tfnas_flags.define_train_flags()
FLAGS = tfnas_flags.FLAGS


def describe_cost(network_cost) -> str:
  return (f"{network_cost.params / 1e6:.3f}M parameters (auxiliary head "
          f"excluded), {network_cost.madds / 1e6:.1f}M multiply-adds per "
          f"image")


@common.clean_errors("tfnas-train", run_dir=lambda: FLAGS.run_dir)
def main(argv):
  del argv  # run_app refuses positional arguments.
  config = tfnas_flags.train_config()  # Validated before TF loads.
  strategy = startup.start_run(FLAGS, config)
  from tfnas.train.retrain import Retrain
  run = Retrain(config, strategy, resume=FLAGS.resume,
                show_progress=FLAGS.progress)
  print(run.genotype)
  for problem in run.genotype.warnings():
    logging.warning("genotype: %s", problem)
  print(f"network: {config.network}, {config.num_cells} cells, "
        f"C={config.channels}: {describe_cost(run.cost)}")
  result = run.run()
  common.print_final(result.history, config.run_dir, config.epochs,
                     ("val/acc", "train/acc"),
                     common.next_step(config.run_dir, "serve"))


def run():
  common.run_app(main, __doc__, tfnas_flags)


if __name__ == "__main__":
  run()
