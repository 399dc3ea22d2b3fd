"""tfnas-train and tfnas-export end to end on digits, and their bad input."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tfnas import data
from tfnas.config import TrainConfig
from tfnas.genotype import Genotype

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num_cells=3", "--channels=4", "--max_steps_per_epoch=3",
        "--steps_per_loop=3", "--epochs=1", "--noprogress"]
IRREGULAR = {"version": 1,
             "normal": {"nodes": [[["sep_conv_3x3", 0], ["skip_connect", 1]],
                                  [["dil_conv_3x3", 2]],
                                  [],
                                  [["max_pool_3x3", 0], ["skip_connect", 3],
                                   ["avg_pool_3x3", 1]]]},
             # No reduce node reads input 1: its preprocessing conv gets
             # no gradient.
             "reduce": {"nodes": [[["skip_connect", 0]], [],
                                  [["sep_conv_5x5", 0], ["max_pool_3x3", 2]]],
                        "concat": [2, 3, 4]}}


def app(name, *args, timeout=600):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
  return subprocess.run([sys.executable, "-m", f"tfnas.apps.{name}", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


def error_line(proc):
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert 1 <= len(lines) <= 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  return lines[0]


def snapshot(directory):
  return {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_digits_retrain_beats_majority_and_exports(tmp_path):
  run_dir = tmp_path / "run"
  proc = app("train", f"--flagfile={ROOT}/flags/train_digits.cfg",
             f"--run_dir={run_dir}", "--epochs=6", "--noprogress")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "parameters (auxiliary head excluded)" in proc.stdout
  assert proc.stdout.splitlines()[-1] == (
      f"next: export it for TF Serving: tfnas-export --run_dir={run_dir} "
      f"--export_dir=exports/run")
  history = [json.loads(l) for l in
             (run_dir / "history.jsonl").read_text().splitlines()]
  assert len(history) == 6
  _, labels = data.load_split("digits", "test")
  majority = np.bincount(labels).max() / len(labels)
  assert majority < 0.15
  assert history[-1]["val/acc"] > majority + 0.6, history[-1]
  assert history[-1]["train/drop_path_prob"] > 0  # Raised over epochs.
  assert Genotype.load(run_dir / "genotype.json") is not None

  export_dir = tmp_path / "serving"
  # (A relative --run_dir: the printed checkpoint is absolute anyway.)
  out = app("export", f"--run_dir={os.path.relpath(run_dir, ROOT)}",
            f"--export_dir={export_dir}")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "multiply-adds" in out.stdout and "parameters" in out.stdout
  meta = json.loads((export_dir / "1" / "metadata.json").read_text())
  assert meta["dataset"] == "digits" and meta["input_shape"] == [8, 8, 1]
  assert (meta["input"]["range"], meta["source_pixel_max"]) == ([0, 255], 16)
  assert meta["val_acc"] == pytest.approx(history[-1]["val/acc"])
  assert meta["epoch"] == len(history)
  assert meta["params"] > 0 and (export_dir / "1" / "saved_model.pb").exists()
  # The line names the checkpoint as metadata.json does (absolute).
  assert os.path.isabs(meta["checkpoint"])
  assert f"exported {meta['checkpoint']} to {export_dir / '1'}" in out.stdout

  # An older checkpoint is a different model: version 1 is kept as is.
  ckpts = sorted((run_dir / "ckpt").glob("ckpt-*.index"),
                 key=lambda p: int(p.stem.split("-")[1]))
  before = snapshot(export_dir)
  # (Named by its .index file: the prefix is meant.)
  again = app("export", f"--checkpoint={ckpts[0]}",
              f"--export_dir={export_dir}", "--version=1")
  assert again.returncode == 2
  assert "already holds a different model" in error_line(again)
  assert snapshot(export_dir) == before
  # A folder as --checkpoint: its run's latest checkpoint, version 1 again.
  same = app("export", f"--checkpoint={run_dir / 'ckpt'}",
             f"--export_dir={export_dir}", "--version=1")
  assert same.returncode == 0, same.stderr[-3000:]
  assert "already holds this model" in same.stdout
  assert snapshot(export_dir) == before
  # The older checkpoint as the next version: its metadata are its epoch's
  # (the checkpoints kept are those of the last epochs, one per epoch).
  older = app("export", f"--checkpoint={ckpts[0]}",
              f"--export_dir={export_dir}")
  assert older.returncode == 0, older.stderr[-3000:]
  meta = json.loads((export_dir / "2" / "metadata.json").read_text())
  epoch = len(history) - len(ckpts) + 1
  assert meta["epoch"] == epoch < len(history)
  assert meta["val_acc"] == pytest.approx(history[epoch - 1]["val/acc"])
  # Version 2, which TF Serving would serve, is older than version 1: said.
  assert (f"version 2 holds an earlier checkpoint of {run_dir} (epoch "
          f"{epoch}) than version 1 (epoch {len(history)})") in older.stderr
  assert "earlier checkpoint" not in out.stderr
  # Exported again without --version: the highest version holds it already.
  repeated = app("export", f"--checkpoint={ckpts[0]}",
                 f"--export_dir={export_dir}")
  assert repeated.returncode == 0, repeated.stderr[-3000:]
  assert "already holds this model" in repeated.stdout
  assert "earlier checkpoint" not in repeated.stderr  # Nothing new written.
  assert sorted(p.name for p in export_dir.iterdir()) == ["1", "2"]

  # A run directory whose config describes another network than its
  # checkpoint: one line, no TF warning flood, nothing exported.
  other = tmp_path / "other"
  shutil.copytree(run_dir, other)
  config = json.loads((other / "config.json").read_text())
  config["channels"] += 2
  (other / "config.json").write_text(json.dumps(config))
  bad = app("export", f"--run_dir={other}",
            f"--export_dir={tmp_path / 'other_serving'}")
  assert bad.returncode == 2
  assert "does not hold the network" in error_line(bad)
  assert "nothing was exported" in error_line(bad)
  assert bad.stderr.count("WARNING") < 5, bad.stderr[-2000:]
  assert not (tmp_path / "other_serving").exists()


@pytest.mark.slow
def test_snas_search_genotype_is_retrained_and_exported(tmp_path):
  # Issue 5: the SNAS digits flagfile, shortened.
  search_dir = tmp_path / "search"
  proc = app("search", f"--flagfile={ROOT}/flags/snas_digits.cfg",
             f"--run_dir={search_dir}", "--epochs=1", "--space=s3",
             "--num_cells=3", "--num_nodes=2", "--channels=4",
             "--max_steps_per_epoch=2", "--steps_per_loop=2", "--noprogress")
  assert proc.returncode == 0, proc.stderr[-3000:]
  genotype = Genotype.load(search_dir / "genotype.json")
  # Exporting the search directory itself is refused (supernet).
  refused = app("export", f"--run_dir={search_dir}",
                f"--export_dir={tmp_path / 'bad'}")
  assert refused.returncode == 2
  assert "supernet" in error_line(refused)
  assert not (tmp_path / "bad").exists()
  run_dir = tmp_path / "train"
  trained = app("train", f"--flagfile={ROOT}/flags/train_digits.cfg",
                f"--genotype={search_dir}", f"--run_dir={run_dir}", *TINY)
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert Genotype.load(run_dir / "genotype.json") == genotype
  out = app("export", f"--run_dir={run_dir}",
            f"--export_dir={tmp_path / 'serving'}")
  assert out.returncode == 0, out.stderr[-3000:]
  assert Genotype.load(tmp_path / "serving" / "1" / "genotype.json") == (
      genotype)


@pytest.mark.slow
def test_genotype_with_0_1_2_3_input_nodes(tmp_path):
  path = tmp_path / "irregular.json"
  path.write_text(json.dumps(IRREGULAR))
  run_dir = tmp_path / "train"
  trained = app("train", f"--flagfile={ROOT}/flags/train_digits.cfg",
                f"--genotype={path}", f"--run_dir={run_dir}", *TINY)
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert "node 4 <- (no inputs)" in trained.stdout
  out = app("export", f"--run_dir={run_dir}",
            f"--export_dir={tmp_path / 'serving'}")
  assert out.returncode == 0, out.stderr[-3000:]


def _write(tmp_path, name, payload):
  path = tmp_path / name
  path.write_text(payload if isinstance(payload, str) else
                  json.dumps(payload))
  return str(path)


def _mutated(fn):
  d = json.loads(json.dumps(IRREGULAR))
  fn(d)
  return d


def _unknown_op(d):
  d["normal"]["nodes"][0][0] = ["conv_9x9", 0]


def _missing_node(d):
  d["reduce"]["concat"] = [2, 3, 6]  # The reduction cell has nodes 2-4.


def _edge_from_later_node(d):
  d["normal"]["nodes"][1][0] = ["skip_connect", 5]


def _genotype_flag(name, mutate):
  return lambda p: [f"--genotype={_write(p, name, _mutated(mutate))}"]


@pytest.mark.parametrize("make_args, fragment", [
    (lambda p: ["--genotype=DARTS_V9"], "unknown genotype 'DARTS_V9'"),
    (_genotype_flag("op.json", _unknown_op), "unknown op 'conv_9x9'"),
    (_genotype_flag("node.json", _missing_node), "index 6 is out of range"),
    (_genotype_flag("edge.json", _edge_from_later_node),
     "input 5 is not an earlier node"),
    (lambda p: [f"--genotype={p / 'missing.json'}"], "not found"),
    (lambda p: ["--channels=5"], "channels"),
    (lambda p: ["--drop_path_prob=1.5"], "drop_path_prob"),
    (lambda p: ["--cutout=16"],
     "--cutout=16 is not smaller than the 8x8 images of digits"),
])
def test_bad_train_input_one_line_nothing_written(tmp_path, make_args,
                                                  fragment):
  run_dir = tmp_path / "run"
  proc = app("train", f"--flagfile={ROOT}/flags/train_digits.cfg",
             f"--run_dir={run_dir}", *TINY, *make_args(tmp_path))
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert fragment in error_line(proc)
  assert not run_dir.exists()


def test_bad_export_input(tmp_path):
  proc = app("export", f"--run_dir={tmp_path / 'nothing'}",
             f"--export_dir={tmp_path / 'serving'}")
  assert proc.returncode == 2
  assert "config.json not found" in error_line(proc)
  proc = app("export", f"--run_dir={tmp_path}")
  assert proc.returncode == 2
  assert "--export_dir is required" in error_line(proc)
  # A mistyped --checkpoint is named, not the config.json beside it.
  proc = app("export", f"--checkpoint={tmp_path / 'nothing' / 'ckpt-3'}",
             f"--export_dir={tmp_path / 'serving'}")
  assert proc.returncode == 2
  assert "nothing/ckpt-3 not found" in error_line(proc)
  (tmp_path / "a" / "ckpt").mkdir(parents=True)
  (tmp_path / "a" / "ckpt" / "checkpoint").write_text("")
  proc = app("export", f"--checkpoint={tmp_path / 'a' / 'ckpt'}",
             f"--run_dir={tmp_path / 'b'}",
             f"--export_dir={tmp_path / 'serving'}")
  assert proc.returncode == 2
  assert "is a folder of another run than --run_dir" in error_line(proc)
  (tmp_path / "a" / "config.json").write_text("{}")  # A prefix of run a.
  proc = app("export", f"--checkpoint={tmp_path / 'a' / 'ckpt' / 'ckpt-3'}",
             f"--run_dir={tmp_path / 'b'}",
             f"--export_dir={tmp_path / 'serving'}")
  assert proc.returncode == 2
  assert "is a checkpoint of another run" in error_line(proc)
  # A tfnas-train run stopped before its first checkpoint (config.json
  # only): the missing checkpoint is named, not its genotype.json.
  (tmp_path / "t").mkdir()
  (tmp_path / "t" / "config.json").write_text(TrainConfig().to_json())
  proc = app("export", f"--run_dir={tmp_path / 't'}",
             f"--export_dir={tmp_path / 'serving'}")
  assert proc.returncode == 2
  assert "t/ckpt holds no checkpoint yet; train first" in error_line(proc)
  # A run directory as the model's base path: its files would sit among
  # the versions.
  proc = app("export", f"--run_dir={tmp_path / 't'}",
             f"--export_dir={tmp_path / 't'}")
  assert proc.returncode == 2
  assert "t holds a tfnas run; give the model a folder of its own" in (
      error_line(proc))
  assert sorted(os.listdir(tmp_path / "t")) == ["config.json"]
  assert not (tmp_path / "serving").exists()


PARSE_FLAGFILES = """
import json, sys
from tfnas.apps import train
from tfnas import flags as tfnas_flags
out = {}
for path in sys.argv[1:]:
  train.FLAGS.unparse_flags()
  train.FLAGS([sys.argv[0], "--flagfile=" + path])
  out[path] = tfnas_flags.train_config().to_dict()
print(json.dumps(out))
"""


def test_train_flagfiles_parse_into_the_paper_settings():
  names = ["train_digits", "train_cifar10", "train_imagenet"]
  paths = [os.path.join(ROOT, "flags", n + ".cfg") for n in names]
  proc = subprocess.run([sys.executable, "-c", PARSE_FLAGFILES, *paths],
                        cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  configs = json.loads(proc.stdout.strip().splitlines()[-1])
  digits, cifar, imagenet = (configs[p] for p in paths)
  assert digits["dataset"] == "digits" and digits["genotype"] == "DARTS_V2"
  # SNAS appendix G.2 (DARTS evaluation recipe).
  assert (cifar["num_cells"], cifar["channels"], cifar["batch_size"],
          cifar["epochs"], cifar["lr"], cifar["lr_min"], cifar["momentum"],
          cifar["weight_decay"], cifar["cutout"], cifar["drop_path_prob"],
          cifar["auxiliary_weight"], cifar["lr_schedule"]) == (
              20, 36, 96, 600, 0.025, 0.0, 0.9, 3e-4, 16, 0.2, 0.4, "cosine")
  # SNAS appendix G.3 (ImageNet mobile setting).
  assert (imagenet["network"], imagenet["num_cells"], imagenet["channels"],
          imagenet["batch_size"], imagenet["epochs"], imagenet["lr"],
          imagenet["lr_schedule"], imagenet["lr_decay"],
          imagenet["weight_decay"], imagenet["auxiliary_weight"]) == (
              "imagenet", 14, 48, 128, 250, 0.1, "exponential", 0.97, 3e-5,
              0.4)
