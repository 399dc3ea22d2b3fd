"""All absl flags of the apps, grouped; read once by each app's ``main``.

Library code never imports this module: apps convert FLAGS into frozen
configs (``tfnas.config``) and pass those down.
"""

from __future__ import annotations

import os

from absl import flags

from tfnas import dataset_names
from tfnas.config import ConfigError, SearchConfig, TrainConfig
from tfnas.spaces import names as space_names

FLAGS = flags.FLAGS

_DEFAULTS = SearchConfig()
_TRAIN_DEFAULTS = TrainConfig()
DATASETS = ("digits", "synthetic", "cifar10", "cifar100", "svhn_cropped",
            "imagenet2012")
SPACES = space_names.SPACES
#: The registered methods (tfnas.methods.METHODS; a test keeps them equal).
#: Listed here so defining flags does not import TensorFlow.
METHODS = ("darts_1st", "darts_2nd", "dsnas", "snas")


def define_run_flags(defaults=_DEFAULTS):
  flags.DEFINE_string("run_dir", defaults.run_dir,
                      "Directory for config.json, checkpoints, TensorBoard "
                      "events and genotype.json.")
  flags.DEFINE_boolean("resume", False,
                       "Continue the run in --run_dir from its last checkpoint.")
  flags.DEFINE_integer("seed", defaults.seed, "Random seed.")
  flags.DEFINE_boolean("deterministic", defaults.deterministic,
                       "Enable TensorFlow op determinism (same seed, flags and "
                       "device give the same run: a search's genotype, a "
                       "retraining's weights).")
  flags.DEFINE_enum("strategy", "auto", ["auto", "default", "mirrored",
                                         "multi_worker"],
                    "tf.distribute strategy: auto = multi_worker when "
                    "TF_CONFIG describes a cluster of several tasks, "
                    "mirrored when several GPUs are visible, else the "
                    "default strategy.")
  flags.DEFINE_integer("cpu_replicas", 0,
                       "Split the CPU into N logical devices, one replica "
                       "each under --strategy=mirrored (which --strategy="
                       "auto then picks): tries a multi-replica run on a "
                       "machine without GPUs; no faster than one replica. "
                       "0: TensorFlow's devices as they are.",
                       lower_bound=0)
  flags.DEFINE_boolean("progress", True,
                       "Show progress bars: one per epoch, and one per "
                       "evaluation that is erased when it ends.")
  flags.DEFINE_integer("intra_op_threads", 0,
                       "Threads one TensorFlow op may use (0: TensorFlow's "
                       "default, one per core). Small networks on few "
                       "cores can run faster with 1 (WORKSPACE_NOTES.md, "
                       "\"CPU threads\").",
                       lower_bound=0)
  flags.DEFINE_integer("inter_op_threads", 0,
                       "TensorFlow ops run at once (0: TensorFlow's "
                       "default).", lower_bound=0)


def define_data_flags(defaults=_DEFAULTS):
  flags.DEFINE_string("dataset", defaults.dataset,
                      f"Dataset: one of {', '.join(DATASETS)} (digits is "
                      "embedded, no download; tfds datasets need --data_dir "
                      "with the prepared data), or npz:PATH, a NumPy file of "
                      "your own images (README \"Your own data\").")
  flags.register_validator("dataset", _known_dataset)
  flags.DEFINE_string("data_dir", None, "tensorflow_datasets data directory.")
  flags.DEFINE_string("manual_dir", None,
                      "Directory holding the dataset archive for an offline "
                      "tfds preparation.")
  if hasattr(defaults, "train_portion"):
    flags.DEFINE_float("train_portion", defaults.train_portion,
                       "DARTS (bi-level): fraction of the training set "
                       "that trains the weights; the rest is the split α "
                       "learns on. SNAS and DSNAS train both on the whole "
                       "training split and report on the test split.")
  flags.DEFINE_integer("batch_size", defaults.batch_size,
                       "Global batch size (over all replicas).")
  flags.DEFINE_integer("pad_crop", defaults.pad_crop,
                       "Zero padding before random crop (0: off; CIFAR: 4).")
  flags.DEFINE_boolean("flip", defaults.flip, "Random horizontal flips.")
  flags.DEFINE_integer("cutout", defaults.cutout,
                       "Cutout square side (0: off).")


def _known_dataset(name: str) -> bool:
  """Flag check of --dataset: a known name, or ``npz:`` and an existing
  file (read later, before the run directory is written)."""
  if name in DATASETS:
    return True
  if dataset_names.is_npz_name(name):
    path, _ = dataset_names.split_name(name)
    if not path.strip():
      raise flags.ValidationError(
          "npz: needs a file: --dataset=npz:/path/to/data.npz")
    if not os.path.isfile(dataset_names.absolute(path)):
      raise flags.ValidationError(
          f"{dataset_names.absolute(path)} is not a file (npz:PATH names a "
          "NumPy .npz file, see README \"Your own data\")")
    return True
  if name.lower().startswith(dataset_names.PREFIX):
    rest = name[len(dataset_names.PREFIX):]
    hint = f"; write the prefix in lower case, npz:{rest}"
  elif name.lower().endswith(".npz") or os.path.isfile(name):
    hint = f"; for a NumPy file write --dataset=npz:{name}"
  else:
    hint = ""
  raise flags.ValidationError(
      f"unknown dataset; use one of {', '.join(DATASETS)}, or npz:PATH for a "
      f"NumPy file of your own images{hint}")


def dataset_name(name: str) -> str:
  """--dataset as a run saves it: an npz file by its absolute path and a
  fingerprint of its content (`tfnas.dataset_names.saved_name`)."""
  if not dataset_names.is_npz_name(name):
    return name
  try:
    return dataset_names.saved_name(name)
  except OSError as e:
    raise ConfigError(f"--dataset={name}: the file cannot be read ({e})"
                      ) from None
  except ValueError as e:
    raise ConfigError(f"--dataset={name}: {e}") from None


def _define_loop_flags(defaults):
  """Epoch loop and network size flags shared by search and retraining."""
  flags.DEFINE_integer("epochs", defaults.epochs, "Training epochs.")
  flags.DEFINE_integer("max_steps_per_epoch", defaults.max_steps_per_epoch,
                       "Cap on steps per epoch (0: whole split).")
  flags.DEFINE_integer("steps_per_loop", defaults.steps_per_loop,
                       "Steps per compiled loop call (metrics are fetched "
                       "between loops).")
  flags.DEFINE_integer("checkpoint_every_steps",
                       defaults.checkpoint_every_steps,
                       "Also checkpoint every N steps inside an epoch (0: "
                       "only at epoch ends).")
  flags.DEFINE_boolean("sync_batch_norm", defaults.sync_batch_norm,
                       "With several replicas (--strategy=mirrored or "
                       "multi_worker): batch-norm statistics over the global "
                       "batch instead of each replica's share, so a step "
                       "equals the one-device step on the global batch "
                       "(costs one all-reduce per BN layer, forward and "
                       "backward).")
  flags.DEFINE_integer("num_cells", defaults.num_cells, "Cells.")
  flags.DEFINE_integer("channels", defaults.channels, "Initial channels C.")


def define_search_flags():
  flags.DEFINE_enum("method", _DEFAULTS.method, METHODS,
                    "Search method (distribution + estimator + selector).")
  flags.DEFINE_enum("space", _DEFAULTS.space, SPACES,
                    "Search space: DARTS cell spaces (darts, s2-s4; "
                    "--num_cells, --num_nodes, --channels) or ShuffleNetV2 "
                    "single-path spaces (shufflenet: 20 blocks for 224x224 "
                    "ImageNet; shufflenet_small: 5 blocks for 8x8-32x32).")
  _define_loop_flags(_DEFAULTS)
  flags.DEFINE_integer("num_nodes", _DEFAULTS.num_nodes,
                       "Intermediate nodes per cell.")
  flags.DEFINE_boolean("recompute", _DEFAULTS.recompute,
                       "Recompute activations in the backward pass instead "
                       "of storing them (less memory, more time). DARTS "
                       "space; in single-path (DSNAS) steps, switched or "
                       "eager, each chosen edge is recomputed by its "
                       "backward function (--recompute_unit=edge).")
  flags.DEFINE_enum("recompute_unit", _DEFAULTS.recompute_unit,
                    ["edge", "cell"],
                    "With --recompute: recompute per mixed edge (least "
                    "memory) or per cell.")
  _define_shufflenet_flags()
  flags.DEFINE_float("w_lr", _DEFAULTS.w_lr, "Weight SGD learning rate.")
  flags.DEFINE_float("w_lr_min", _DEFAULTS.w_lr_min,
                     "Floor of the cosine schedule: epoch e of the E "
                     "epochs after any warm-up runs at w_lr_min + (w_lr - "
                     "w_lr_min)(1 + cos(πe/E))/2, so the last epoch stays "
                     "a little above it (as in DARTS; with --w_lr_per_step "
                     "the last step nearly reaches it).")
  flags.DEFINE_integer("w_lr_warmup_epochs", _DEFAULTS.w_lr_warmup_epochs,
                       "Epochs of linear learning-rate warm-up before the "
                       "cosine schedule, which then spans the remaining "
                       "epochs: step t of the warm-up's steps T takes "
                       "w_lr * (t + 1) / T.")
  flags.DEFINE_boolean("w_lr_per_step", _DEFAULTS.w_lr_per_step,
                       "Anneal the cosine schedule every step instead of "
                       "once per epoch.")
  flags.DEFINE_float("w_momentum", _DEFAULTS.w_momentum, "SGD momentum.")
  flags.DEFINE_float("w_weight_decay", _DEFAULTS.w_weight_decay,
                     "Weight decay (L2) of the weights.")
  flags.DEFINE_boolean("exclude_bn_from_weight_decay",
                       _DEFAULTS.exclude_bn_from_weight_decay,
                       "No weight decay on batch-norm scales and shifts.")
  flags.DEFINE_float("grad_clip", _DEFAULTS.grad_clip,
                     "Global-norm gradient clip of the weights (0: off).")
  flags.DEFINE_float("arch_lr", _DEFAULTS.arch_lr, "α Adam learning rate.")
  flags.DEFINE_float("arch_beta1", _DEFAULTS.arch_beta1, "α Adam beta1.")
  flags.DEFINE_float("arch_beta2", _DEFAULTS.arch_beta2, "α Adam beta2.")
  flags.DEFINE_float("arch_weight_decay", _DEFAULTS.arch_weight_decay,
                     "α weight decay (L2).")
  flags.DEFINE_float("arch_init_scale", _DEFAULTS.arch_init_scale,
                     "α (logits) initialised as scale * N(0, 1); 0 gives "
                     "uniform logits.")
  flags.DEFINE_float("temperature_start", _DEFAULTS.temperature_start,
                     "SNAS: Gumbel-softmax temperature λ at the first step.")
  flags.DEFINE_float("temperature_end", _DEFAULTS.temperature_end,
                     "SNAS: λ at the last step of the search (--epochs "
                     "times the steps per epoch; a resume that changes "
                     "--epochs moves λ to where the new schedule is at "
                     "that step).")
  flags.DEFINE_enum("temperature_schedule", _DEFAULTS.temperature_schedule,
                    ["linear", "exponential"], "SNAS: how λ is annealed.")
  flags.DEFINE_boolean("resample_per_cell", _DEFAULTS.resample_per_cell,
                       "SNAS: draw a separate architecture sample for "
                       "every cell (default: one per cell type, shared).")
  flags.DEFINE_float("resource_weight", _DEFAULTS.resource_weight,
                     "SNAS: η of the resource constraint η·C(Z) (0: off); "
                     "DSNAS's cost penalty is --flops_weight.")
  flags.DEFINE_enum("resource_metric", _DEFAULTS.resource_metric,
                    ["params", "flops", "mac", "all"],
                    "SNAS: local cost per op (all: mean of the three, "
                    "normalised).")
  flags.DEFINE_enum("resource_gradient", _DEFAULTS.resource_gradient,
                    ["policy", "reparam", "exact"],
                    "SNAS: α-gradient of the resource term: score "
                    "function (eq. 11), through the relaxed sample, or "
                    "exact expectation under the discrete distribution.")
  flags.DEFINE_float("label_smoothing", _DEFAULTS.label_smoothing,
                     "Cross-entropy label smoothing of the search loss.")
  flags.DEFINE_boolean("reward_normalization", _DEFAULTS.reward_normalization,
                       "DSNAS: normalise each decision's cost dL/dgate by "
                       "its running mean and standard deviation (a baseline "
                       "for the score-function α-gradient).")
  flags.DEFINE_boolean("update_unsampled", _DEFAULTS.update_unsampled,
                       "DSNAS: weight decay and momentum also move the "
                       "candidates a step did not draw (a zero gradient), as "
                       "in the authors' code; off: a step updates only its "
                       "child's weights.")
  flags.DEFINE_float("flops_weight", _DEFAULTS.flops_weight,
                     "DSNAS: η of a penalty η·E[F(Z)], F(Z) = the searched "
                     "decisions' multiply-adds of child Z divided by those "
                     "of the costliest child (what every child has, stem, "
                     "preprocessing and head, excluded; "
                     "logged as train/flops), exact α-gradient (0: off).")
  flags.DEFINE_float("flops_target", _DEFAULTS.flops_target,
                     "DSNAS: FLOPs budget of the whole child in millions of "
                     "multiply-adds per image, the FLOPs tfnas-export "
                     "reports (in a cell space pooling edges count "
                     "H·W·9·C; 0: none). "
                     "The --flops_weight penalty then acts only on steps "
                     "whose sampled child exceeds it.")
  flags.DEFINE_float("early_stop_threshold", _DEFAULTS.early_stop_threshold,
                     "DSNAS progressive early stop (eq. 8): fix a decision "
                     "once its best candidate leads the runner-up by this "
                     "much (probabilities, or logits with "
                     "--early_stop_on_logits); 0: never.")
  flags.DEFINE_boolean("early_stop_on_logits", _DEFAULTS.early_stop_on_logits,
                       "DSNAS: compare α logits (eq. 8 as printed) instead "
                       "of softmax probabilities.")
  flags.DEFINE_integer("early_stop_every_steps",
                       _DEFAULTS.early_stop_every_steps,
                       "DSNAS: check the early-stop condition every N "
                       "steps (0: at the end of every epoch).")
  flags.DEFINE_integer("compiled_children", _DEFAULTS.compiled_children,
                       "Single-path methods (DSNAS): once early stop leaves "
                       "at most N possible children, run each child's step "
                       "as one traced graph, kept for the rest of the run "
                       "(1: once every decision is fixed; 0: always eager, "
                       "one shared traced function per op).")
  flags.DEFINE_enum("single_path_step", _DEFAULTS.single_path_step,
                    ["eager", "switch"],
                    "DSNAS: 'switch' traces ONE step graph that serves "
                    "every child (each edge or block picks its op at run "
                    "time; in the DARTS space each edge keeps the tensors "
                    "its backward pass reads, or with --recompute runs its "
                    "op again in backprop: ~15% slower, a quarter less "
                    "peak memory; in the ShuffleNet space, where blocks "
                    "are recomputed, 1.7x faster than 'eager' for 0.25 GiB "
                    "more, WORKSPACE_NOTES.md); 'eager' runs the chosen "
                    "ops from Python.")


def _is_int_list(values) -> bool:
  return all(v.strip().isdigit() for v in values)


def _define_shufflenet_flags():
  """Shape of the ShuffleNet spaces, each overriding the --space preset."""
  flags.DEFINE_list("stage_repeats", [],
                    "ShuffleNet spaces: blocks per stage, comma-separated "
                    "(e.g. 1,1,2,1; the first block of a stage has stride "
                    "2). Empty: the --space preset.")
  flags.DEFINE_list("stage_channels", [],
                    "ShuffleNet spaces: output channels per stage, even and "
                    "increasing (e.g. 16,32,64,128). Empty: the preset.")
  for name in ("stage_repeats", "stage_channels"):
    flags.register_validator(name, _is_int_list,
                             "must be comma-separated positive integers")
  flags.DEFINE_integer("stem_channels", _DEFAULTS.stem_channels,
                       "ShuffleNet spaces: channels of the stem conv (0: the "
                       "preset).", lower_bound=0)
  flags.DEFINE_integer("head_channels", _DEFAULTS.head_channels,
                       "ShuffleNet spaces: channels of the last 1x1 conv "
                       "(0: the preset).", lower_bound=0)


def define_train_flags():
  """Flags of tfnas-train (with define_run_flags/define_data_flags)."""
  d = _TRAIN_DEFAULTS
  _define_loop_flags(d)
  flags.DEFINE_string("genotype", d.genotype,
                      "Published genotype name (DARTS_V1, DARTS_V2, ...), a "
                      "genotype.json file or a run directory holding one.")
  flags.DEFINE_enum("network", d.network, ["cifar", "imagenet"],
                    "Evaluation network: CIFAR stem or ImageNet mobile stems.")
  flags.DEFINE_float("auxiliary_weight", d.auxiliary_weight,
                     "Weight of the auxiliary head's loss (0: no head).")
  flags.DEFINE_float("drop_path_prob", d.drop_path_prob,
                     "Final drop-path probability (raised linearly from 0 "
                     "over the epochs).")
  flags.DEFINE_float("lr", d.lr, "Initial SGD learning rate.")
  flags.DEFINE_float("lr_min", d.lr_min,
                     "Floor of the cosine schedule: epoch e of E runs at "
                     "lr_min + (lr - lr_min)(1 + cos(πe/E))/2, so the last "
                     "epoch stays a little above it (as in DARTS).")
  flags.DEFINE_enum("lr_schedule", d.lr_schedule, ["cosine", "exponential"],
                    "cosine (per epoch, to --lr_min) or exponential "
                    "(x --lr_decay after every epoch).")
  flags.DEFINE_float("lr_decay", d.lr_decay,
                     "Per-epoch factor of the exponential schedule.")
  flags.DEFINE_float("momentum", d.momentum, "SGD momentum.")
  flags.DEFINE_float("weight_decay", d.weight_decay, "Weight decay (L2).")
  flags.DEFINE_float("grad_clip", d.grad_clip,
                     "Global-norm gradient clip (0: off).")
  flags.DEFINE_float("label_smoothing", d.label_smoothing,
                     "Cross-entropy label smoothing (ImageNet: 0.1).")


def train_config() -> TrainConfig:
  """Reads the retraining flags once into a frozen config."""
  names = [f for f in TrainConfig.__dataclass_fields__]
  values = {name: FLAGS[name].value for name in names}
  values["dataset"] = dataset_name(values["dataset"])
  return TrainConfig(**values)


def search_config() -> SearchConfig:
  """Reads the search flags once into a frozen config."""
  names = [f for f in SearchConfig.__dataclass_fields__]
  values = {name: FLAGS[name].value for name in names}
  for name in ("stage_repeats", "stage_channels"):
    values[name] = tuple(int(v) for v in values[name])
  values["dataset"] = dataset_name(values["dataset"])
  config = SearchConfig(**values)
  config.check_method_fields()
  return config
