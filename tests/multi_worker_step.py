"""One worker of the MultiWorkerMirroredStrategy tests (run by test_multi_worker).

Usage: python tests/multi_worker_step.py darts|dsnas OUT.npz
(TF_CONFIG and INIT_PATH set by the test). ``darts``: one DARTS first-order
step on this worker's half of a fixed global batch (then
`distribute.same_on_every_worker` on one key and on per-worker keys,
written to OUT.npz.same.json); ``dsnas``: one eager
DSNAS step in the replica block space (`helpers.dsnas_block_steps`). Saves the
updated weights and α.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

strategy = tf.distribute.MultiWorkerMirroredStrategy()

from tests import helpers  # noqa: E402
from tfnas import distribute  # noqa: E402
from tfnas.estimators.darts import DartsFirstOrder  # noqa: E402


def main(method, out_path):
  task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
  init = np.load(os.environ["INIT_PATH"], allow_pickle=True)["values"]
  if method == "dsnas":
    np.savez(out_path, *helpers.dsnas_block_steps(strategy, init, task))
    return
  with strategy.scope():
    ctx = helpers.tiny_context(
        space=helpers.replica_space(sync_batch_norm=True), global_batch=4)
  for v, value in zip(ctx.weight_variables + ctx.arch_variables, init):
    v.assign(value)
  train, val = helpers.batch(seed=1), helpers.batch(seed=2)
  half = lambda t: (t[0][2 * task:2 * task + 2], t[1][2 * task:2 * task + 2])
  local = (half(train), half(val))

  def dataset_fn(input_context):
    return tf.data.Dataset.from_tensors(local)

  dist = strategy.distribute_datasets_from_function(dataset_fn)

  @tf.function(autograph=False)  # As the search loop traces its steps.
  def step(batches):
    return strategy.run(DartsFirstOrder().step,
                        args=(ctx, batches[0], batches[1],
                              tf.constant(0, tf.int64)))
  for batches in dist:
    step(batches)
  values = [v.numpy() for v in ctx.weight_variables + ctx.arch_variables]
  np.savez(out_path, *values)
  # The workers' data check: one key everywhere, then one key per worker.
  same = [distribute.same_on_every_worker(strategy, key)
          for key in ("the same data", f"worker {task}'s data")]
  with open(out_path + ".same.json", "w") as f:
    json.dump(same, f)


if __name__ == "__main__":
  main(*sys.argv[1:])
