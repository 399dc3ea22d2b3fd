"""tfnas-search: architecture search from the command line.

    tfnas-search --flagfile=flags/darts_digits.cfg

Writes config.json, checkpoints, TensorBoard events (tb/), genotype.json
and arch.json into --run_dir.
"""

from __future__ import annotations


from tfnas import dataset_names
from tfnas import flags as tfnas_flags
from tfnas.apps import common
from tfnas.apps import startup

tfnas_flags.define_run_flags()
tfnas_flags.define_data_flags()
tfnas_flags.define_search_flags()
FLAGS = tfnas_flags.FLAGS


@common.clean_errors("tfnas-search", run_dir=lambda: FLAGS.run_dir)
def main(argv):
  del argv  # run_app refuses positional arguments.
  config = tfnas_flags.search_config()  # Validated before TF loads.
  strategy = startup.start_run(FLAGS, config)
  from tfnas.train.search import Search
  search = Search(config, strategy, resume=FLAGS.resume,
                  show_progress=FLAGS.progress)
  print(search.describe())
  result = search.run()
  print(result.genotype)
  common.print_final(
      result.history, config.run_dir, config.epochs,
      ("val/acc", "val/child_acc", "train/acc"),
      common.next_step(config.run_dir, "export" if
                       search.method.deploys_search_weights else "retrain",
                       dataset_names.flag_name(config.dataset)))


def run():
  common.run_app(main, __doc__, tfnas_flags)


if __name__ == "__main__":
  run()
