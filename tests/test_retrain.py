"""The retraining loop: exact resume, drop-path schedule, run-dir safety."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests import helpers
from tfnas.config import TrainConfig
from tfnas import data
from tfnas import models
from tfnas import genotypes
from tfnas.genotype import Genotype
from tfnas.train import rundir, stopping
from tfnas.train.retrain import Retrain


def tiny_config(run_dir, **overrides):
  kwargs = dict(run_dir=str(run_dir), dataset="digits", genotype="DARTS_V2",
                num_cells=2, channels=4, batch_size=32, epochs=2,
                max_steps_per_epoch=3, steps_per_loop=2, pad_crop=1,
                flip=False, cutout=2, lr=0.05, drop_path_prob=0.3, seed=4)
  kwargs.update(overrides)
  return TrainConfig(**kwargs)


class RetrainTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    tf.config.experimental.enable_op_determinism()

  def test_auxiliary_weight_scales_the_auxiliary_loss(self):
    # One plain SGD step (no decay, no clipping): the auxiliary classifier
    # learns from the auxiliary loss alone, so its step scales with the
    # weight.
    moves = []
    for weight in (0.4, 0.8):
      run = Retrain(tiny_config(
          os.path.join(self.get_temp_dir(), f"w{weight}"), epochs=1,
          max_steps_per_epoch=1, steps_per_loop=1, weight_decay=0.0,
          grad_clip=0.0, drop_path_prob=0.0, auxiliary_weight=weight),
                    show_progress=False)
      kernel = run.network.auxiliary_head.classifier.kernel
      before = kernel.numpy()
      run.run()
      moves.append(kernel.numpy() - before)
    self.assertGreater(np.abs(moves[0]).max(), 1e-6)
    # float32 differences of weights ~1e-1 moved by ~1e-5: ~1e-3 relative.
    self.assertAllClose(moves[1], 2 * moves[0], rtol=2e-3, atol=1e-8)

  def test_resume_matches_uninterrupted_run(self):
    base = self.get_temp_dir()
    straight = Retrain(tiny_config(os.path.join(base, "a")),
                       show_progress=False)
    straight.run()
    config = tiny_config(os.path.join(base, "b"))
    first = Retrain(config, show_progress=False)
    history = first.run(stop_after_epochs=1).history
    self.assertLen(history, 1)
    self.assertEqual(history[0]["train/drop_path_prob"], 0.0)
    moved = [v.numpy() for v in first.network.trainable_weights]
    resumed = Retrain(config, resume=True, show_progress=False)
    result = resumed.run()
    self.assertLen(result.history, 1)
    self.assertEqual(result.history[0]["epoch"], 2)
    # Epoch 2 of 2 uses drop-path 0.3 * 1/2.
    self.assertAllClose(result.history[0]["train/drop_path_prob"], 0.15)
    changed = 0.0
    for a, b in zip(straight.network.weights, resumed.network.weights):
      self.assertAllClose(a.numpy(), b.numpy(), atol=1e-6, msg=a.path)
    for a, m in zip(straight.network.trainable_weights, moved):
      changed = max(changed, float(np.abs(a.numpy() - m).max()))
    self.assertGreater(changed, 1e-4)  # Epoch 2 really trained.
    saved = Genotype.load(os.path.join(base, "b", "genotype.json"))
    self.assertEqual(saved, resumed.genotype)
    lines = open(os.path.join(base, "b", "history.jsonl")).read().splitlines()
    self.assertEqual([json.loads(l)["epoch"] for l in lines], [1, 2])
    # Each line is written after the epoch's evaluation.
    self.assertTrue(all("val/acc" in json.loads(l) for l in lines))
    # A resume asking for fewer epochs than finished runs none, and the
    # run's config.json still says how many it has.
    fewer = Retrain(tiny_config(os.path.join(base, "b"), epochs=1),
                    resume=True, show_progress=False)
    self.assertEqual(fewer.run().history, [])
    self.assertEqual(rundir.read_config(os.path.join(base, "b"))["epochs"], 2)

  def test_ctrl_c_as_an_epoch_is_saved_keeps_its_metrics(self):
    helpers.ctrl_c_as_an_epoch_is_saved(
        self, Retrain, tiny_config(os.path.join(self.get_temp_dir(), "r")))

  def test_resume_mid_epoch_keeps_the_epochs_train_metrics(self):
    base = self.get_temp_dir()
    helpers.stop_mid_epoch_and_resume(
        self, Retrain, tiny_config(os.path.join(base, "a"), epochs=1),
        tiny_config(os.path.join(base, "b"), epochs=1),
        ("train/loss", "train/acc", "val/loss"))

  def test_resume_past_an_unreadable_checkpoint_repeats_its_epoch_once(self):
    base = self.get_temp_dir()
    config = tiny_config(os.path.join(base, "b"))
    # The uninterrupted run whose last checkpoint is then damaged.
    straight = Retrain(config, show_progress=False)
    straight.run()
    # The last epoch's checkpoint is cut short (a full disk, a crash).
    newest = tf.train.latest_checkpoint(os.path.join(config.run_dir, "ckpt"))
    self.assertTrue(newest.endswith("ckpt-6"))
    data_file = newest + ".data-00000-of-00001"
    with open(data_file, "r+b") as f:
      f.truncate(os.path.getsize(data_file) // 2)
    resumed = Retrain(config, resume=True, show_progress=False)
    self.assertEqual(int(resumed.epoch.numpy()), 1)  # From ckpt-3.
    self.assertEqual([h["epoch"] for h in resumed.run().history], [2])
    lines = open(os.path.join(config.run_dir,
                              "history.jsonl")).read().splitlines()
    # Epoch 2's line of the first run was dropped, not kept twice.
    self.assertEqual([json.loads(l)["epoch"] for l in lines], [1, 2])
    for a, b in zip(straight.network.weights, resumed.network.weights):
      self.assertAllClose(a.numpy(), b.numpy(), atol=1e-6, msg=a.path)

  @staticmethod
  def _count_saves(run) -> list:
    """Records the ``totals`` of every ``run._save`` call."""
    calls, save = [], run._save  # pylint: disable=protected-access

    def counted(totals=None):
      calls.append(totals)
      return save(totals=totals)
    run._save = counted  # pylint: disable=protected-access
    return calls

  def _sigterm_during_evaluation(self, run, after: bool):
    """Patches ``run.evaluate`` to send this process SIGTERM before (or,
    with ``after``, once) the evaluation runs, as a scheduler would."""
    evaluate = run.evaluate

    def patched(interrupted=None):
      if not after:
        os.kill(os.getpid(), signal.SIGTERM)
      out = evaluate(interrupted)
      if after:
        os.kill(os.getpid(), signal.SIGTERM)
      return out
    run.evaluate = patched

  def test_sigterm_in_evaluation_stops_there_and_resumes_exactly(self):
    base = self.get_temp_dir()
    straight = Retrain(tiny_config(os.path.join(base, "a"), epochs=1),
                       show_progress=False).run()
    config = tiny_config(os.path.join(base, "b"), epochs=1)
    first = Retrain(config, show_progress=False)
    self._sigterm_during_evaluation(first, after=False)
    saves = self._count_saves(first)
    with self.assertRaises(stopping.StopRequested) as stopped:
      first.run()
    self.assertEqual(stopped.exception.signum, signal.SIGTERM)
    self.assertLen(saves, 1)  # Saved once, with the epoch's sums.
    self.assertIsNotNone(saves[0])
    # The training steps were saved with their sums, no epoch was logged.
    self.assertEqual(int(first.epoch.numpy()), 0)
    self.assertEqual(int(first.step_in_epoch.numpy()), 3)
    self.assertFalse(os.path.exists(os.path.join(config.run_dir,
                                                 "history.jsonl")))
    resumed = Retrain(config, resume=True, show_progress=False).run()
    self.assertLen(resumed.history, 1)
    for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
      self.assertAllClose(resumed.history[0][key], straight.history[0][key],
                          rtol=1e-5, msg=key)

  def test_sigterm_while_an_epoch_ends_stops_before_the_next(self):
    base = self.get_temp_dir()
    config = tiny_config(os.path.join(base, "b"), max_steps_per_epoch=1)
    first = Retrain(config, show_progress=False)
    self._sigterm_during_evaluation(first, after=True)
    saves = self._count_saves(first)
    with self.assertRaises(stopping.StopRequested):
      first.run()
    self.assertEqual(saves, [None])  # The epoch's end only, not again.
    # Stopped at the epoch's end, before any step of the next one.
    self.assertEqual(int(first.epoch.numpy()), 1)
    self.assertEqual(int(first.step_in_epoch.numpy()), 0)
    self.assertEqual(int(first.optimizer.iterations.numpy()), 1)
    lines = open(os.path.join(base, "b", "history.jsonl")).read().splitlines()
    self.assertEqual([json.loads(l)["epoch"] for l in lines], [1])
    # In the last epoch the run is complete: it ends normally.
    resumed = Retrain(config, resume=True, show_progress=False)
    self._sigterm_during_evaluation(resumed, after=True)
    self.assertEqual([h["epoch"] for h in resumed.run().history], [2])

  def test_run_dir_refuses_other_run(self):
    run_dir = os.path.join(self.get_temp_dir(), "r")
    source = os.path.join(self.get_temp_dir(), "source.json")
    genotypes.resolve("DARTS_V2").save(source)
    config = tiny_config(run_dir, epochs=1, max_steps_per_epoch=1,
                         genotype=source)
    Retrain(config, show_progress=False).run()
    before = {f: os.path.getmtime(os.path.join(run_dir, f))
              for f in os.listdir(run_dir)}
    with self.assertRaisesRegex(rundir.RunDirError, "already holds a run"):
      Retrain(config, show_progress=False)
    with self.assertRaisesRegex(rundir.RunDirError, "different config"):
      Retrain(tiny_config(run_dir, channels=6, genotype=source), resume=True,
              show_progress=False)
    with self.assertRaisesRegex(rundir.RunDirError,
                                "different config .*dataset: 'digits'"):
      Retrain(tiny_config(run_dir, genotype=source, dataset="cifar10",
                          data_dir=os.path.join(run_dir, "none")),
              resume=True, show_progress=False)
    after = {f: os.path.getmtime(os.path.join(run_dir, f))
             for f in os.listdir(run_dir)}
    self.assertEqual(before, after)
    # A finished run resumed writes no (empty) event file.
    events = sorted(os.listdir(os.path.join(run_dir, "tb")))
    self.assertEqual(Retrain(config, resume=True,
                             show_progress=False).run().history, [])
    self.assertEqual(sorted(os.listdir(os.path.join(run_dir, "tb"))), events)
    # The run's genotype.json lost and its --genotype file changed (the
    # checkpoint of DARTS_V2 would restore into DARTS_V1's tiny network
    # without an error): refused, nothing written.
    os.remove(os.path.join(run_dir, "genotype.json"))
    genotypes.resolve("DARTS_V1").save(source)
    before = {f: os.path.getmtime(os.path.join(run_dir, f))
              for f in os.listdir(run_dir)}
    with self.assertRaisesRegex(rundir.RunDirError,
                                "genotype.json is missing"):
      Retrain(config, resume=True, show_progress=False)
    self.assertEqual(before, {f: os.path.getmtime(os.path.join(run_dir, f))
                              for f in os.listdir(run_dir)})


# Runs in its own interpreter: collectives of MirroredStrategy objects that
# earlier tests created in the same process (same devices) can collide.
MIRRORED = """
import json, os, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from tfnas.config import TrainConfig
from tfnas.train.retrain import Retrain
devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
strategy = tf.distribute.MirroredStrategy(devices)
config = TrainConfig(run_dir=sys.argv[1], dataset="digits",
                     genotype="DARTS_V2", num_cells=2, channels=4,
                     batch_size=32, epochs=2, max_steps_per_epoch=2,
                     steps_per_loop=2, pad_crop=1, flip=False, cutout=0,
                     drop_path_prob=0.3, seed=4, sync_batch_norm=True)
run = Retrain(config, strategy=strategy, show_progress=False)
from tfnas.layers.batch_norm import BatchNorm
bns = [l for l in run.network._flatten_layers() if isinstance(l, BatchNorm)]
synchronized = len(bns) > 5 and all(l.synchronized for l in bns)
print(json.dumps([strategy.num_replicas_in_sync, synchronized,
                  run.run().history]))
"""


def test_two_replicas_train_and_evaluate(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([sys.executable, "-c", MIRRORED,
                         str(tmp_path / "m")], cwd=root, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  replicas, synchronized, history = json.loads(
      proc.stdout.strip().splitlines()[-1])
  # With synchronized BN (--sync_batch_norm): statistics over both replicas.
  assert replicas == 2 and synchronized and len(history) == 2
  for metrics in history:
    assert np.isfinite(metrics["train/loss"])
    assert 0.0 <= metrics["val/acc"] <= 1.0


# Same interpreter rule as MIRRORED. One run on the default strategy, one on
# two mirrored replicas from the same initial weights; no drop path and no
# random augmentation, so the only difference is the split of each batch.
# At lr 0.1 this tiny network's loss doubles in four steps, and rounding
# differences grew to 5e-4 on an AVX2 CPU (1e-7 at lr 0.03).
MIRRORED_EQUALS_ONE_DEVICE = """
import json, sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from tfnas.config import TrainConfig
from tfnas.train.retrain import Retrain
config = TrainConfig(run_dir=sys.argv[1] + "/one", dataset="digits",
                     genotype="DARTS_V2", num_cells=3, channels=4,
                     auxiliary_weight=0.4, batch_size=32, epochs=2,
                     max_steps_per_epoch=2, steps_per_loop=2, pad_crop=0,
                     flip=False, cutout=0, drop_path_prob=0.0, lr=0.03,
                     weight_decay=3e-3, seed=4, sync_batch_norm=True)
one = Retrain(config, show_progress=False)
init = [v.numpy() for v in one.network.weights]
devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
two = Retrain(config.replace(run_dir=sys.argv[1] + "/two"),
              strategy=tf.distribute.MirroredStrategy(devices),
              show_progress=False)
assert [v.path for v in two.network.weights] == [
    v.path for v in one.network.weights]
for v, value in zip(two.network.weights, init):
  v.assign(value)
history = [one.run().history, two.run().history]
after = [[v.numpy() for v in r.network.weights] for r in (one, two)]
print(json.dumps({
    "replicas": two.strategy.num_replicas_in_sync,
    "has_aux": one.network.auxiliary_head is not None,
    "moved": max(float(np.abs(a - b).max())
                 for a, b, v in zip(after[0], init, one.network.weights)
                 if v.trainable),
    "diff": max(float(np.abs(a - b).max() / (1 + np.abs(a).max()))
                for a, b in zip(*after)),
    "history": history}))
"""


def test_two_replicas_train_like_one_device(tmp_path):
  """Mirrored retraining (synchronized BN) takes the one-device steps:
  weights, BN statistics and every epoch's metrics agree."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([sys.executable, "-c", MIRRORED_EQUALS_ONE_DEVICE,
                         str(tmp_path)], cwd=root, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["replicas"] == 2 and out["has_aux"]
  assert out["moved"] > 1e-2  # Four steps moved the weights,
  assert out["diff"] < 1e-4, out["diff"]  # and both runs moved them alike.
  one, two = out["history"]
  assert len(one) == len(two) == 2
  for a, b in zip(one, two):
    assert set(a) == set(b)
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(a), a
    for key in a:
      if key.startswith(("train/", "val/")):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5,
                                   err_msg=key)


def test_the_genotype_of_an_unfinished_search_is_warned_of(tmp_path, caplog,
                                                           monkeypatch):
  from tfnas.train.retrain import load_genotype
  search = tmp_path / "search"
  search.mkdir()
  genotypes.resolve("DARTS_V2").save(str(search / "genotype.json"))
  (search / "config.json").write_text(json.dumps(
      {"method": "darts_1st", "epochs": 3}))
  (search / "history.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")
  for spec in (search, search / "genotype.json"):
    caplog.clear()
    load_genotype(tiny_config(tmp_path / "run", genotype=str(spec)), False)
    assert (f"the search in {search} finished 1 of its 3 epochs" in
            caplog.text)
  # A published name is not that search's, run from inside it or not.
  monkeypatch.chdir(search)
  for spec in ("DARTS_V2", "genotype.json"):
    caplog.clear()
    load_genotype(tiny_config(tmp_path / "run", genotype=spec), False)
    assert ("finished 1 of its 3 epochs" in caplog.text) == (
        spec == "genotype.json")
  # Finished: nothing to say.
  (search / "history.jsonl").write_text("".join(
      json.dumps({"epoch": e}) + "\n" for e in (1, 2, 3)))
  caplog.clear()
  load_genotype(tiny_config(tmp_path / "run", genotype=str(search)), False)
  assert "epochs" not in caplog.text


def test_a_network_ill_suited_to_the_image_size_is_warned_of(tmp_path,
                                                              caplog):
  assert models.size_warnings("imagenet", 224) == []
  assert models.size_warnings("imagenet", 32) == []
  assert models.size_warnings("cifar", 32) == []
  assert models.size_warnings("cifar", 64) == []
  assert "shrinks 16x16 inputs to 2x2" in models.size_warnings(
      "imagenet", 16)[0]
  assert "full 224x224 inputs" in models.size_warnings("cifar", 224)[0]
  for network, warned in (("imagenet", True), ("cifar", False)):
    caplog.clear()
    # An oversized batch stops the run after the warning, before any build.
    with pytest.raises(data.DataError, match="--batch_size"):
      Retrain(tiny_config(tmp_path / network, network=network,
                          batch_size=100000))
    assert ("--network=imagenet shrinks 8x8 inputs to 1x1" in
            caplog.text) == warned, caplog.text
    assert not (tmp_path / network).exists()
