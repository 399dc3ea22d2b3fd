"""Every flagfile in flags/ parses into a valid config of its app."""

import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGFILES = sorted(glob.glob(os.path.join(ROOT, "flags", "*.cfg")))

# Reads the flagfiles the way the apps do and prints each config; a bad
# flag, value or dataset name ends that file's entry with the error.
_CHECK = r"""
import importlib, json, sys
from tfnas import data, flags as tfnas_flags
kind, paths = sys.argv[1], sys.argv[2:]
importlib.import_module(f"tfnas.apps.{kind}")  # Defines the app's flags.
out = {}
for path in paths:
  try:
    tfnas_flags.FLAGS.unparse_flags()
    tfnas_flags.FLAGS(["prog", f"--flagfile={path}"])
    config = getattr(tfnas_flags, f"{kind}_config")()
    data.dataset_info(config.dataset)
    out[path] = config.to_dict()
  except Exception as e:  # pylint: disable=broad-except
    out[path] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def _kind(path):
  return "train" if os.path.basename(path).startswith("train_") else "search"


def _parse(kind, paths):
  proc = subprocess.run([sys.executable, "-c", _CHECK, kind, *paths],
                        capture_output=True, text=True, timeout=300,
                        cwd=ROOT, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["search", "train"])
def test_flagfiles_give_valid_configs(kind):
  paths = [p for p in FLAGFILES
           if _kind(p) == kind and not p.endswith("_common.cfg")]
  assert paths
  results = _parse(kind, paths)
  bad = {os.path.basename(p): r for p, r in results.items()
         if isinstance(r, str)}
  assert not bad, bad
  for path, config in results.items():
    with open(path) as f:
      assert f.readline().startswith("#"), path  # Headed by a comment.
    assert config["run_dir"].startswith("runs/"), path


def test_imagenet_flagfiles_use_the_streamed_dataset():
  results = _parse("search", [os.path.join(ROOT, "flags", "dsnas_imagenet.cfg")])
  config = next(iter(results.values()))
  assert config["dataset"] == "imagenet2012" and config["batch_size"] == 1024
  results = _parse("train", [os.path.join(ROOT, "flags", "train_imagenet.cfg")])
  config = next(iter(results.values()))
  assert config["dataset"] == "imagenet2012" and config["network"] == "imagenet"
  assert config["pad_crop"] == 0


def test_dataset_flag_lists_the_built_in_datasets():
  from tfnas import data
  from tfnas import flags as tfnas_flags
  assert sorted(tfnas_flags.DATASETS) == sorted(
      name for name in data.DATASETS if not name.startswith("imagenet2012_"))


def test_dsnas_flagfiles_carry_the_paper_settings():
  names = ("dsnas_imagenet", "dsnas_cifar10", "dsnas_digits")
  results = _parse("search", [os.path.join(ROOT, "flags", f"{n}.cfg")
                              for n in names])
  imagenet, cifar, digits = (results[os.path.join(ROOT, "flags", f"{n}.cfg")]
                             for n in names)
  for config in (imagenet, cifar, digits):
    assert config["method"] == "dsnas"
    assert config["early_stop_threshold"] == 0.3
    assert not config["early_stop_on_logits"]
  # DSNAS 4.2 (ImageNet, SPOS space): SGD 0.5 momentum 0.9, cosine over 240
  # epochs, weight decay 4e-5, α Adam 1e-3, global batch 1024, label
  # smoothing 0.1.
  assert imagenet["space"] == "shufflenet"
  assert (imagenet["w_lr"], imagenet["w_momentum"], imagenet["epochs"],
          imagenet["w_weight_decay"], imagenet["arch_lr"],
          imagenet["batch_size"], imagenet["label_smoothing"]) == (
              0.5, 0.9, 240, 4e-5, 1e-3, 1024, 0.1)
  # The authors' released search config: 5 warm-up epochs, cosine per
  # iteration, no weight decay on batch-norm parameters.
  assert (imagenet["w_lr_warmup_epochs"], imagenet["w_lr_per_step"],
          imagenet["exclude_bn_from_weight_decay"]) == (5, True, True)
  # "FLOPS <= 330M": the budget, and a weight the header derives as 64e-5
  # per MFLOP times the costliest child's block FLOPs (360M).
  from tfnas import objectives
  from tfnas.config import SearchConfig
  from tfnas.spaces import registry
  space = registry.space_config(SearchConfig(space="shufflenet"), 1000, 224)
  scale = objectives.decision_flops(space, 224).scale
  assert imagenet["flops_target"] == 330
  assert imagenet["flops_weight"] == round(64e-5 * scale / 1e6, 2) == 0.23
  # The CIFAR setting searches the DARTS cell space (C=16, 8 cells), every
  # child through one switched step graph.
  assert cifar["single_path_step"] == "switch"
  assert cifar["space"] == "darts" and cifar["dataset"] == "cifar10"
  assert (cifar["channels"], cifar["num_cells"]) == (16, 8)
  assert digits["space"] == "shufflenet_small"
  assert digits["dataset"] == "digits"
  assert digits["single_path_step"] == "switch"


def test_shufflenet_shape_flags_become_int_lists(tmp_path):
  path = tmp_path / "shape.cfg"
  path.write_text("--method=dsnas\n--space=shufflenet_small\n"
                  "--dataset=digits\n--stage_repeats=1, 2\n"
                  "--stage_channels=8,16\n--stem_channels=4\n")
  config = _parse("search", [str(path)])[str(path)]
  assert not isinstance(config, str), config
  # Printed through JSON: the config's int tuples arrive as lists.
  assert (config["stage_repeats"], config["stage_channels"]) == ([1, 2],
                                                                 [8, 16])
  assert (config["stem_channels"], config["head_channels"]) == (4, 0)


def test_snas_cifar_flagfiles_carry_the_paper_settings():
  # snas.md 3.1 and appendix G.1: 8 cells, C=16, batch 64, 150 epochs; θ
  # SGD 0.025 annealed to zero (cosine), momentum 0.9, wd 3e-4; α Adam 3e-4,
  # β (0.5, 0.999), wd 1e-3; single level.
  paths = [os.path.join(ROOT, "flags", f"snas_cifar10_{level}.cfg")
           for level in ("mild", "moderate", "aggressive")]
  results = _parse("search", paths)
  weights = []
  for path in paths:
    c = results[path]
    assert isinstance(c, dict), c
    assert (c["method"], c["space"], c["dataset"]) == (
        "snas", "darts", "cifar10")
    assert (c["num_cells"], c["channels"], c["batch_size"], c["epochs"]) == (
        8, 16, 64, 150)
    assert (c["w_lr"], c["w_lr_min"], c["w_momentum"],
            c["w_weight_decay"]) == (0.025, 0.0, 0.9, 3e-4)
    assert (c["arch_lr"], c["arch_beta1"], c["arch_beta2"],
            c["arch_weight_decay"]) == (3e-4, 0.5, 0.999, 1e-3)
    weights.append(c["resource_weight"])
  assert weights == sorted(weights) and len(set(weights)) == 3
