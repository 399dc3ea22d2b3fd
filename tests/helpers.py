"""Small shared builders for tests: tiny spaces, networks and contexts, and
a SavedModel served in a fresh process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import tensorflow as tf

from tfnas.arch import ArchParams, OneHotDistribution, SoftmaxDistribution
from tfnas.errors import StopRequested
from tfnas.estimators.dsnas import DsnasEstimator
from tfnas.spaces import darts as darts_space
from tfnas.spaces import shufflenet
from tfnas.train import optim
from tfnas.train.step import StepContext

TINY_OPS = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3")


@contextlib.contextmanager
def floatx(dtype):
  """New Keras layers in ``dtype`` inside the block. Keras caches the global
  dtype policy on first use, after which set_floatx alone no longer changes
  the dtype of new layers: both are set, and both restored."""
  old_floatx, old_policy = keras.config.floatx(), keras.config.dtype_policy()
  keras.config.set_floatx(dtype)
  keras.config.set_dtype_policy(dtype)
  try:
    yield
  finally:
    keras.config.set_floatx(old_floatx)
    keras.config.set_dtype_policy(old_policy)


def float64_for(test) -> None:
  """`floatx` float64 from now until the end of ``test`` (a TestCase)."""
  block = floatx("float64")
  block.__enter__()
  test.addCleanup(block.__exit__, None, None, None)

def tiny_space(**overrides):
  kwargs = dict(candidates=TINY_OPS, num_nodes=2, num_cells=3, channels=4,
                num_classes=3)
  kwargs.update(overrides)
  return darts_space.DartsSpaceConfig(**kwargs)


REPLICA_OPS = ("none", "skip_connect", "sep_conv_3x3")


def replica_space(**overrides):
  """`tiny_space` with one node per cell and no pooling op: for tests
  comparing replicas or workers with one device, where more nodes and
  parameter-free ops only add trace time (`none` stays for single-path
  steps, `sep_conv_3x3` brings weights and BatchNorm)."""
  return tiny_space(**dict(dict(num_nodes=1, candidates=REPLICA_OPS),
                           **overrides))


def batch(n=4, size=8, channels=3, classes=3, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((n, size, size, channels)).astype(dtype)
  labels = rng.integers(0, classes, n).astype(np.int32)
  return tf.constant(images), tf.constant(labels)


def tiny_context(space=None, global_batch=4, input_shape=(8, 8, 3),
                 dtype=tf.float32, w_lr=0.05, arch_lr=3e-3, seed=0,
                 arch_init_scale=0.5, sync_batch_norm=False):
  """Network, α, optimizers and a StepContext, built in the current scope."""
  space = space or tiny_space(sync_batch_norm=sync_batch_norm)
  net = darts_space.build_search_network(space, input_shape)
  arch = ArchParams(space.decision_groups(), init_scale=arch_init_scale,
                    seed=seed, dtype=dtype)
  w_opt = optim.SGD(w_lr, momentum=0.9, weight_decay=3e-4, clip_norm=5.0)
  w_opt.build(net.trainable_variables)
  a_opt = optim.Adam(arch_lr, beta_1=0.5, beta_2=0.999, weight_decay=1e-3)
  a_opt.build(arch.variables_list)
  return StepContext(net, arch, SoftmaxDistribution(), w_opt, a_opt,
                     global_batch)


def tiny_block_space(**overrides):
  kwargs = dict(stage_channels=(8, 16, 32, 64), stem_channels=4,
                head_channels=16, num_classes=3, dropout=0.0)
  kwargs.update(overrides)
  return shufflenet.ShuffleNetSpaceConfig.small(**kwargs)


def replica_block_space(**overrides):
  """Three blocks (two stride-2, one stride-1): the multi-replica DSNAS
  tests compare every variable after traced and eager steps, which scale
  with the number of blocks."""
  kwargs = dict(stage_repeats=(1, 2), stage_channels=(8, 16))
  kwargs.update(overrides)
  return tiny_block_space(**kwargs)


def block_context(space=None, arch_lr=3e-3, seed=0, arch_init_scale=0.5,
                  dtype=tf.float32):
  space = space or tiny_block_space()
  net = shufflenet.build_shufflenet_supernet(space, (8, 8, 3))
  arch = ArchParams(space.decision_groups(), init_scale=arch_init_scale,
                    seed=seed, dtype=dtype)
  w_opt = optim.SGD(0.05, momentum=0.9, weight_decay=3e-4, clip_norm=5.0)
  w_opt.build(net.trainable_variables)
  a_opt = optim.Adam(arch_lr, beta_1=0.5, beta_2=0.999, weight_decay=1e-3)
  a_opt.build(arch.variables_list)
  return StepContext(net, arch, OneHotDistribution(seed=seed), w_opt, a_opt,
                     4)


def dsnas_block_steps(strategy, init=None, task=None, steps=1):
  """Eager DSNAS steps in the replica block space (synchronized BN) under
  ``strategy``, from ``init`` values if given; ``task`` (0 or 1) takes
  that worker's half of each global batch of 4. Returns the weights and α.
  """
  with strategy.scope():
    ctx = block_context(replica_block_space(sync_batch_norm=True))
    est = DsnasEstimator()
  variables = ctx.weight_variables + ctx.arch_variables
  for v, value in zip(variables, [] if init is None else init):
    v.assign(value)
  for step in range(steps):
    images, labels = batch(n=4, classes=3, seed=step)
    if task is None:  # The global batch, split over local replicas.
      dist = strategy.experimental_distribute_dataset(
          tf.data.Dataset.from_tensors((images, labels)))
    else:
      half = (images[2 * task:2 * task + 2], labels[2 * task:2 * task + 2])
      dist = strategy.distribute_datasets_from_function(
          lambda _, b=half: tf.data.Dataset.from_tensors(b))
    for b in dist:
      strategy.run(est.step, args=(ctx, b, None, step))
  return [np.asarray(v.numpy()) for v in variables]


# Runs in a fresh interpreter: TensorFlow only, no tfnas.
RELOAD_SAVED_MODEL = """
import sys, numpy as np, tensorflow as tf
assert not any(m == "tfnas" or m.startswith("tfnas.") for m in sys.modules)
loaded = tf.saved_model.load(sys.argv[1])
fn = loaded.signatures["serving_default"]
out = fn(images=tf.constant(np.load(sys.argv[2])))
np.savez(sys.argv[3], logits=out["logits"].numpy(),
         probabilities=out["probabilities"].numpy())
assert not any(m == "tfnas" or m.startswith("tfnas.") for m in sys.modules)
"""


def stop_mid_epoch_and_resume(test, run_class, straight_config, config,
                              keys):
  """Runs ``run_class`` (Search or Retrain) straight with
  ``straight_config``, and with ``config`` stopped after its first chunk of
  steps (as a SIGTERM would stop it) and resumed; the resumed epoch's
  ``keys`` must equal the straight run's."""
  straight = run_class(straight_config, show_progress=False).run()
  first = run_class(config, show_progress=False)
  first._agree = lambda stop: True  # pylint: disable=protected-access
  with test.assertRaises(KeyboardInterrupt):
    first.run()
  test.assertEqual(int(first.step_in_epoch.numpy()), config.steps_per_loop)
  test.assertTrue(os.path.exists(os.path.join(config.run_dir,
                                              "partial_epoch.json")))
  resumed = run_class(config, resume=True, show_progress=False).run()
  test.assertLen(resumed.history, 1)
  # Its epoch has ended: the record of its first steps is gone.
  test.assertFalse(os.path.exists(os.path.join(config.run_dir,
                                               "partial_epoch.json")))
  for key in keys:
    test.assertAllClose(resumed.history[0][key], straight.history[0][key],
                        rtol=1e-5, msg=key)


def ctrl_c_as_an_epoch_is_saved(test, run_class, config):
  """Runs ``run_class`` (Search or Retrain) with ``config`` (two epochs or
  more) and presses Ctrl-C right after the first epoch's checkpoint is
  written: the epoch's history line must still be written before the run
  stops, and a resume must go on with the next epoch."""
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  test.addCleanup(signal.signal, signal.SIGINT, previous)
  run = run_class(config, show_progress=False)
  save = run._save  # pylint: disable=protected-access

  def save_then_ctrl_c(**kwargs):
    saved = save(**kwargs)
    if not kwargs:  # The end of an epoch (mid-epoch saves pass sums).
      os.kill(os.getpid(), signal.SIGINT)
    return saved
  run._save = save_then_ctrl_c  # pylint: disable=protected-access
  with test.assertRaises(KeyboardInterrupt) as stopped:
    run.run()
  # A stop honoured after the epoch was written, not a bare Ctrl-C.
  test.assertIsInstance(stopped.exception, StopRequested)
  test.assertTrue(stopped.exception.saved)
  test.assertEqual(stopped.exception.signum, signal.SIGINT)
  history = os.path.join(config.run_dir, "history.jsonl")

  def epochs():
    with open(history) as f:
      return [json.loads(line)["epoch"] for line in f]
  test.assertEqual(epochs(), [1])
  resumed = run_class(config, resume=True, show_progress=False).run()
  test.assertEqual([h["epoch"] for h in resumed.history],
                   list(range(2, config.epochs + 1)))
  test.assertEqual(epochs(), list(range(1, config.epochs + 1)))


def serve_in_fresh_process(path, images, work_dir):
  """Feeds ``images`` to the SavedModel's ``serving_default`` in a new
  interpreter that loads it with TensorFlow alone (what a serving client
  has); returns its ``logits`` and ``probabilities`` as numpy arrays."""
  work_dir = str(work_dir)
  np.save(os.path.join(work_dir, "x.npy"), np.asarray(images, np.float32))
  env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH="")
  proc = subprocess.run(
      [sys.executable, "-c", RELOAD_SAVED_MODEL, str(path),
       os.path.join(work_dir, "x.npy"), os.path.join(work_dir, "out.npz")],
      cwd=work_dir, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = np.load(os.path.join(work_dir, "out.npz"))
  return {k: out[k] for k in ("logits", "probabilities")}
