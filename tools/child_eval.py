"""Child-network validation of a finished search, without fine-tuning.

Loads a search run directory (config.json + latest checkpoint) and evaluates
the supernet on the search's evaluation split (the held-out part of the
training split for DARTS, --train_portion, the test split for the single-level SNAS and
DSNAS) twice: with the search distribution's sample (softmax α / relaxed
sample at the final temperature) and with the one-hot argmax child (SNAS
Table 1: the child as derived, no fine-tuning). Prints JSON with both
results, the split, and the checkpoint with its epoch. Nothing in the run
directory is written.

    python tools/child_eval.py --run_dir=runs/snas_digits
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tfnas.apps import common  # noqa: E402
from tfnas.apps import startup  # noqa: E402

flags.DEFINE_string("run_dir", None, "A search run directory.", required=True)
flags.DEFINE_boolean("progress", True, "Draw a progress bar over the "
                     "evaluation batches.")
FLAGS = flags.FLAGS


@common.clean_errors("child_eval")
def main(argv):
  del argv
  from tfnas.config import SearchConfig
  from tfnas.train import rundir
  if not os.path.exists(os.path.join(FLAGS.run_dir, "config.json")):
    raise rundir.RunDirError(f"{FLAGS.run_dir} holds no search run (no "
                             f"config.json)")
  saved = rundir.read_config(FLAGS.run_dir)
  if rundir.run_kind(saved) != "tfnas-search":
    raise rundir.RunDirError(f"{FLAGS.run_dir} holds a "
                             f"{rundir.run_kind(saved) or 'non-tfnas'} run, "
                             f"not a tfnas-search run")
  # The directory is the run (moved or copied runs included).
  config = SearchConfig.from_dict({**saved, "run_dir": FLAGS.run_dir})
  startup.import_tensorflow()
  from tfnas.train.search import Search
  search = Search(config, show_progress=FLAGS.progress, read_only=True)
  result = {**search.evaluate(), **search.evaluate(child=True)}
  result.update(
      split=search.data.eval_split,
      checkpoint=os.path.abspath(search.restored),
      epoch=int(search.epoch.numpy()))
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  common.run_app(main, __doc__)
