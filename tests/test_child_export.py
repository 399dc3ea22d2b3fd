"""tfnas-export of a DSNAS search child (no retraining), end to end on digits.

That the child predicts like the supernet with its architecture fixed is
tested in test_child.py; here: search CLI → export CLI → serving outputs
equal to the in-memory child, BN recalibration, and what is refused.
"""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import helpers
from tests.test_train_cli import ROOT, app, error_line
from tfnas import child as child_lib
from tfnas import child_export
from tfnas import data
from tfnas import methods
from tfnas.block_genotype import BlockGenotype
from tfnas.config import SearchConfig, TrainConfig
from tfnas.errors import TfnasError
from tfnas.layers.batch_norm import BatchNorm
from tfnas.train.checkpointing import ModelVariables

# metadata.json keys of a retrained export that a child's export keeps, so
# serving clients preprocess both the same way.
RETRAIN_KEYS = ("dataset", "num_classes", "input_shape", "mean", "std",
                "source_pixel_max", "params", "checkpoint", "epoch")


@pytest.fixture(scope="module")
def search_run(tmp_path_factory):
  """The README's DSNAS digits search, 4 steps, a checkpoint every 2."""
  run_dir = tmp_path_factory.mktemp("dsnas") / "run"
  proc = app("search", f"--flagfile={ROOT}/flags/dsnas_digits.cfg",
             f"--run_dir={run_dir}", "--epochs=1", "--max_steps_per_epoch=4",
             "--steps_per_loop=2", "--checkpoint_every_steps=2",
             "--noprogress")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return run_dir


def digits_test_accuracy(model):
  """Accuracy of ``model`` (inference mode) on the whole digits test split,
  counted here batch by batch."""
  images, labels = data.load_split("digits", "test")
  correct = 0
  for x, y in data.make_dataset(images, labels, data.dataset_info("digits"),
                                batch_size=100, training=False):
    predicted = np.argmax(model(x, training=False).numpy(), axis=1)
    correct += int((predicted == y.numpy()).sum())
  return correct / len(labels), len(labels)


def digits_test_images(n=32):
  """Raw test images in [0, 255] (what a client sends) and the same images
  normalised by the training pipeline (what the in-memory child takes)."""
  images, labels = data.load_split("digits", "test")
  info = data.dataset_info("digits")
  normalised, _ = next(iter(data.make_dataset(
      images[:n], labels[:n], info, batch_size=n, training=False)))
  return images[:n], normalised


def batch_norms(model):
  return [l for l in model._flatten_layers() if isinstance(l, BatchNorm)]


@pytest.mark.slow
def test_exported_child_serves_like_the_in_memory_child(search_run,
                                                        tmp_path):
  export_dir = tmp_path / "serving"
  out = app("export", f"--run_dir={search_run}", f"--export_dir={export_dir}",
            "--recalibrate_batches=0")
  assert out.returncode == 0, out.stderr[-3000:]
  path = export_dir / "1"
  child, genotype, info = child_lib.load_search_child(str(search_run))
  assert f"{info['params'] / 1e6:.3f}M parameters" in out.stdout
  assert "M FLOPs (whole network" in out.stdout
  assert "the supernet's BN statistics" in out.stdout
  assert (f"to {path} (signature serving_default: images float32 "
          f"[batch, 8, 8, 1] in [0, 255]") in out.stdout

  meta = json.loads((path / "metadata.json").read_text())
  assert all(key in meta for key in RETRAIN_KEYS), sorted(meta)
  assert os.path.isabs(meta["checkpoint"])
  assert f"exported {meta['checkpoint']} to {path}" in out.stdout
  digits = data.dataset_info("digits")
  assert (meta["dataset"], meta["num_classes"], meta["input_shape"]) == (
      "digits", 10, [8, 8, 1])
  assert (meta["mean"], meta["std"]) == (list(digits.mean), list(digits.std))
  # Served inputs are 0-255; scikit-learn's digits are 0-16.
  assert (meta["input"]["range"], meta["source_pixel_max"]) == ([0, 255], 16)
  assert (meta["params"], meta["flops"]) == (info["params"], info["flops"])
  assert meta["flops"] > 0 and meta["source"] == child_export.SOURCE
  # The whole network's count, under a retrained export's key (a block
  # space has no pooling candidates: the same count).
  assert meta["madds"] == round(meta["flops"])
  assert meta["checkpoint"] == os.path.abspath(info["checkpoint"])
  assert meta["bn_recalibration_batches"] == 0
  assert meta["epoch"] == 1 and "step_in_epoch" not in meta  # Epoch's end.
  assert meta["method"] == "dsnas" and meta["space"] == "shufflenet_small"
  # --evaluate (default): the deployed child's accuracy on the test split.
  accuracy, examples = digits_test_accuracy(child)
  assert (meta["val_split"], meta["val_examples"]) == ("test", examples)
  assert meta["val_acc"] == pytest.approx(accuracy, abs=1e-6)
  assert np.isfinite(meta["val_loss"]) and meta["val_loss"] > 0
  assert (f"deployed child on the test split ({examples} examples): "
          f"val/acc {accuracy:.4f}") in out.stdout
  assert BlockGenotype.load(path / "genotype.json") == genotype
  assert genotype == BlockGenotype.load(search_run / "genotype.json")

  raw, normalised = digits_test_images()
  served = helpers.serve_in_fresh_process(path, raw, tmp_path)
  logits = child(normalised, training=False).numpy()
  assert np.abs(logits).max() > 1e-3  # Not a trivially zero network.
  assert np.abs(served["logits"] - logits).max() < 1e-5
  assert np.abs(served["probabilities"] -
                tf.nn.softmax(logits).numpy()).max() < 1e-5


@pytest.mark.slow
def test_recalibrated_child_of_an_older_checkpoint(search_run, tmp_path,
                                                  caplog):
  older = str(search_run / "ckpt" / "ckpt-2")
  plain, _, _ = child_lib.load_search_child(str(search_run),
                                            checkpoint=older)
  recalibrated, _, info = child_lib.load_search_child(
      str(search_run), recalibrate_batches=2, checkpoint=older)
  assert info["recalibrated_batches"] == 2 and info["checkpoint"] == older
  # More batches than the split holds: all of them, and a warning.
  _, _, every = child_lib.load_search_child(
      str(search_run), recalibrate_batches=10_000, checkpoint=older)
  assert 2 < every["recalibrated_batches"] < 10_000
  assert (f"recalibrate_batches=10000: the training split holds "
          f"{every['recalibrated_batches']} batches") in caplog.text
  # Every BN's moving statistics moved; no weight did. (A BN that no step
  # of the short search trained starts from mean 0; where its input's
  # channel means are also ~0, only its variance can show the move.)
  moved_means = 0
  for before, after in zip(batch_norms(plain), batch_norms(recalibrated)):
    assert not np.allclose(before.moving_variance, after.moving_variance)
    moved_means += not np.allclose(before.moving_mean, after.moving_mean)
  assert moved_means > len(batch_norms(plain)) // 2  # 24 of 28 here.
  for before, after in zip(plain.trainable_variables,
                           recalibrated.trainable_variables):
    np.testing.assert_array_equal(before, after)
  with pytest.raises(TfnasError, match="ckpt-99 not found"):
    child_lib.load_search_child(str(search_run),
                                checkpoint=str(search_run / "ckpt/ckpt-99"))

  # No --run_dir: the run is the checkpoint's.
  export_dir = tmp_path / "serving"
  out = app("export", f"--checkpoint={older}", f"--export_dir={export_dir}",
            "--recalibrate_batches=2")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "BN statistics re-estimated on 2 training batches" in out.stdout
  meta = json.loads((export_dir / "1" / "metadata.json").read_text())
  assert meta["bn_recalibration_batches"] == 2
  assert meta["checkpoint"] == os.path.abspath(older)
  # Written mid-epoch (--checkpoint_every_steps=2 of 4 steps).
  assert (meta["epoch"], meta["step_in_epoch"]) == (0, 2)
  # Measured with the re-estimated statistics.
  assert meta["val_acc"] == pytest.approx(
      digits_test_accuracy(recalibrated)[0], abs=1e-6)
  raw, normalised = digits_test_images()
  serve = tf.saved_model.load(str(export_dir / "1")).signatures[
      "serving_default"]
  served = serve(images=tf.constant(raw))["logits"].numpy()
  np.testing.assert_allclose(
      served, recalibrated(normalised, training=False), atol=1e-5)
  assert np.abs(served - plain(normalised, training=False)).max() > 1e-4


@pytest.mark.slow
def test_checkpoint_of_another_network_is_one_error_line(search_run,
                                                         tmp_path):
  other = keras.Sequential([keras.layers.Dense(3)])
  other.build((None, 4))
  path = tf.train.Checkpoint(network=ModelVariables(other)).save(
      str(tmp_path / "other" / "ckpt"))
  with pytest.raises(TfnasError, match="does not hold the supernet.*holds "
                     "no value for"):
    child_lib.load_search_child(str(search_run), checkpoint=path)
  serving = tmp_path / "serving"
  proc = app("export", f"--run_dir={search_run}", f"--checkpoint={path}",
             f"--export_dir={serving}")
  assert proc.returncode == 2
  # One line, not TensorFlow's warning per unrestored checkpoint value.
  assert "does not hold the supernet" in error_line(proc)
  assert not serving.exists()


@pytest.mark.slow
def test_a_checkpoint_of_the_run_itself_is_accepted_however_spelt(
    search_run, tmp_path):
  # --run_dir through a symlink and with a trailing slash: the same run as
  # the checkpoint's, not "another run".
  link = tmp_path / "link"
  link.symlink_to(search_run)
  out = app("export", f"--run_dir={link}/",
            f"--checkpoint={search_run / 'ckpt' / 'ckpt-2'}",
            f"--export_dir={tmp_path / 'serving'}", "--noevaluate")
  assert out.returncode == 0, out.stderr[-3000:]
  assert (tmp_path / "serving" / "1" / "saved_model.pb").exists()


def test_only_dsnas_search_runs_deploy_their_search_weights(tmp_path):
  deployable = {m.name for m in methods.METHODS.values()
                if m.deploys_search_weights}
  assert deployable == {"dsnas"}
  run_dir = tmp_path / "darts"
  run_dir.mkdir()
  config = SearchConfig(run_dir=str(run_dir), method="darts_1st",
                        dataset="digits")
  (run_dir / "config.json").write_text(config.to_json())
  proc = app("export", f"--run_dir={run_dir}",
             f"--export_dir={tmp_path / 'serving'}")
  assert proc.returncode == 2
  line = error_line(proc)
  assert "darts_1st search run: its supernet is never exported" in line
  assert f"tfnas-train --genotype={run_dir}" in line
  assert not (tmp_path / "serving").exists()


def test_bad_recalibrate_batches(tmp_path):
  serving = tmp_path / "serving"
  proc = app("export", f"--run_dir={tmp_path}", f"--export_dir={serving}",
             "--recalibrate_batches=-1")
  assert proc.returncode == 2
  assert "invalid --recalibrate_batches=-1" in error_line(proc)
  with pytest.raises(TfnasError, match="recalibrate_batches=-1"):
    child_lib.load_search_child(str(tmp_path), recalibrate_batches=-1)
  # A retrained network's BN statistics are its own: not re-estimated.
  config = TrainConfig(run_dir=str(tmp_path), dataset="digits")
  (tmp_path / "config.json").write_text(config.to_json())
  proc = app("export", f"--run_dir={tmp_path}", f"--export_dir={serving}",
             "--recalibrate_batches=2")
  assert proc.returncode == 2
  assert "applies to DSNAS search children only" in error_line(proc)
  assert not serving.exists()


def test_a_config_json_that_is_not_a_run_config(tmp_path):
  (tmp_path / "config.json").write_text("[1, 2]")
  proc = app("export", f"--run_dir={tmp_path}",
             f"--export_dir={tmp_path / 'serving'}")
  assert proc.returncode == 2
  assert "holds a JSON list, not a run config" in error_line(proc)
  assert not (tmp_path / "serving").exists()


def test_madds_are_the_whole_networks_convolutions_and_classifier():
  info = {"dataset": "digits", "num_classes": 10, "image_size": 8,
          "channels": 1, "method": "dsnas", "space": "shufflenet_small",
          "params": 10, "flops": 71260.4, "madds": 71260.4,
          "checkpoint": "c", "recalibrated_batches": 0,
          "flops_scope": "whole network, multiply-adds per image"}
  meta = child_export.search_child_metadata("r", info)
  assert meta["madds"] == 71260 and meta["flops"] == 71260.4
  assert child_export.describe_flops(meta) == (
      "0.07126M FLOPs (whole network, multiply-adds per image)")
  # A cell-space child's FLOPs also count its pooling edges.
  cells = child_export.search_child_metadata(
      "r", dict(info, space="darts", flops=2_500_000.0, madds=2_250_000.0))
  assert (cells["flops"], cells["madds"]) == (2_500_000.0, 2_250_000)
  assert child_export.describe_flops(
      dict(cells, flops_scope="whole network")) == (
          "2.5M FLOPs (whole network; 2.25M without them)")


# tfnas-export whose process receives a signal right after the version is in
# place (while its summary prints): the export stands and the status is 0.
_LATE_SIGNAL = r"""
import os, signal, sys
from tfnas.apps import export as app
signum = getattr(signal, sys.argv.pop(1))
line = app._signature_line
def signalled(*args):
  os.kill(os.getpid(), signum)
  return line(*args)
app._signature_line = signalled
app.run()
"""


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_signal_after_the_export_is_written_leaves_status_0(
    search_run, tmp_path, signum):
  import subprocess
  import sys
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
  proc = subprocess.run(
      [sys.executable, "-c", _LATE_SIGNAL, signum, f"--run_dir={search_run}",
       f"--export_dir={tmp_path}/serving", "--noevaluate"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"to {tmp_path}/serving/1 (signature" in proc.stdout
  assert (tmp_path / "serving" / "1" / "saved_model.pb").exists()
