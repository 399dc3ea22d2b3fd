"""Frozen, validated configuration of the search app.

Apps turn absl FLAGS into these dataclasses once; nothing below the app
layer reads flags.
"""

from __future__ import annotations


import dataclasses
import json
import math
from typing import Any

from tfnas.errors import TfnasError
from tfnas.spaces import names as space_names


class ConfigError(TfnasError):
  """A configuration value is invalid; the message names it."""


class _Config:
  """What every frozen run config shares: validation, JSON, replacement."""

  def _check(self, checks) -> None:
    """Raises ConfigError for the first ``(field, ok, requirement)`` whose
    ``ok`` is false, saying what the value must be. Every float field
    must be finite first (``inf`` passes ``>= 0``)."""
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(
            f"invalid --{field.name}={value!r}: must be a finite number")
    for name, ok, requirement in checks:
      if not ok:
        raise ConfigError(
            f"invalid --{name}={getattr(self, name)!r}: {requirement}")

  def _loop_checks(self) -> list:
    """The checks of the loop and data fields every run config has."""
    return [
        # Empty (e.g. --run_dir=$UNSET) would write the run into the
        # working directory.
        ("run_dir", bool(str(self.run_dir).strip()),
         "must name the run's directory"),
        ("epochs", self.epochs >= 1, "must be at least 1"),
        ("batch_size", self.batch_size >= 1, "must be at least 1"),
        ("steps_per_loop", self.steps_per_loop >= 1, "must be at least 1"),
        ("max_steps_per_epoch", self.max_steps_per_epoch >= 0,
         "must be 0 (the whole epoch) or more"),
        ("checkpoint_every_steps", self.checkpoint_every_steps >= 0,
         "must be 0 (at epoch ends only) or more"),
        ("seed", 0 <= self.seed < 2**32,
         "must be between 0 and 4294967295 (2**32 - 1)"),
        ("pad_crop", self.pad_crop >= 0, "must be 0 (off) or more"),
        ("cutout", self.cutout >= 0, "must be 0 (off) or more"),
    ]

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]):
    if not isinstance(d, dict):
      raise ConfigError(f"a run config must be a JSON object, not "
                        f"{type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ConfigError(f"unknown config keys {unknown}")
    try:
      return cls(**d)
    except TypeError as e:  # A value of the wrong type (e.g. "abc" cells).
      raise ConfigError(f"config values of the wrong type ({e})") from None

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class SearchConfig(_Config):
  """Everything a search run depends on (saved as ``config.json``)."""
  # Run.
  run_dir: str = "runs/search"
  method: str = "darts_1st"
  seed: int = 0
  epochs: int = 50
  max_steps_per_epoch: int = 0  # 0: the whole split.
  steps_per_loop: int = 10
  checkpoint_every_steps: int = 0  # 0: once per epoch.
  deterministic: bool = True
  sync_batch_norm: bool = False  # BN statistics over all replicas.
  # Data.
  dataset: str = "cifar10"
  data_dir: str | None = None
  manual_dir: str | None = None
  train_portion: float = 0.5
  batch_size: int = 64
  pad_crop: int = 0
  flip: bool = False
  cutout: int = 0
  # Space.
  space: str = "darts"
  num_cells: int = 8
  num_nodes: int = 4
  channels: int = 16
  recompute: bool = False
  recompute_unit: str = "edge"
  # ShuffleNet spaces: overrides of the preset's shape (empty / 0: preset).
  stage_repeats: tuple[int, ...] = ()
  stage_channels: tuple[int, ...] = ()
  stem_channels: int = 0
  head_channels: int = 0
  # Weight optimiser.
  w_lr: float = 0.025
  w_lr_min: float = 0.001
  w_lr_warmup_epochs: int = 0  # Linear warm-up before the cosine.
  w_lr_per_step: bool = False  # Cosine per step instead of per epoch.
  w_momentum: float = 0.9
  w_weight_decay: float = 3e-4
  exclude_bn_from_weight_decay: bool = False
  grad_clip: float = 5.0
  # Architecture optimiser.
  arch_lr: float = 3e-4
  arch_beta1: float = 0.5
  arch_beta2: float = 0.999
  arch_weight_decay: float = 1e-3
  arch_init_scale: float = 1e-3
  # Relaxed (Gumbel-softmax) sampling: SNAS.
  temperature_start: float = 1.0
  temperature_end: float = 0.03
  temperature_schedule: str = "linear"
  resample_per_cell: bool = False
  # Resource constraint (SNAS section 2.4): η, metric, α-gradient estimator.
  resource_weight: float = 0.0
  resource_metric: str = "all"
  resource_gradient: str = "policy"
  # DSNAS (dsnas.md 3.2-3.5).
  label_smoothing: float = 0.0
  reward_normalization: bool = False
  # Weight decay and momentum also move the candidates a step did not draw
  # (zero gradient), as in the authors' code; off: only the child's weights.
  update_unsampled: bool = False
  flops_weight: float = 0.0
  # Budget in millions of multiply-adds per image (0: none); see flags.py.
  flops_target: float = 0.0
  early_stop_threshold: float = 0.3  # 0: no progressive early stop.
  early_stop_on_logits: bool = False
  early_stop_every_steps: int = 0  # 0: check at the end of every epoch.
  # Single-path steps run as one traced graph per child once at most this
  # many children remain possible (1: once every decision is fixed; 0: off).
  compiled_children: int = 1
  # How a single-path step runs before that: "eager" (the chosen ops as
  # shared functions called from Python) or "switch" (one traced graph for
  # every child, the op chosen at run time: `tfnas.layers.switch_path`).
  single_path_step: str = "eager"

  def __post_init__(self):
    # Lists from config.json become tuples, so equal configs compare equal.
    for name in ("stage_repeats", "stage_channels"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    checks = self._loop_checks() + [
        ("stage_repeats", all(r >= 1 for r in self.stage_repeats),
         "every stage needs at least 1 block"),
        ("stage_channels", all(c >= 2 for c in self.stage_channels),
         "every stage needs at least 2 channels"),
        ("stem_channels", self.stem_channels >= 0,
         "must be 0 (the preset's) or more"),
        ("head_channels", self.head_channels >= 0,
         "must be 0 (the preset's) or more"),
        ("train_portion", 0.0 < self.train_portion < 1.0,
         "must be strictly between 0 and 1"),
        ("num_cells", self.num_cells >= 1, "must be at least 1"),
        ("num_nodes", self.num_nodes >= 1, "must be at least 1"),
        ("channels", self.channels >= 2 and self.channels % 2 == 0,
         "must be even and at least 2"),
        ("w_lr", self.w_lr > 0, "must be positive"),
        ("w_lr_min", 0 <= self.w_lr_min <= self.w_lr,
         f"must be between 0 and --w_lr={self.w_lr:g}"),
        ("w_lr_warmup_epochs", self.w_lr_warmup_epochs >= 0,
         "must be 0 or more"),
        ("w_momentum", 0 <= self.w_momentum < 1, "must be in [0, 1)"),
        ("w_weight_decay", self.w_weight_decay >= 0, "must be 0 or more"),
        ("grad_clip", self.grad_clip >= 0, "must be 0 (no clipping) or more"),
        ("arch_lr", self.arch_lr >= 0, "must be 0 or more"),
        ("arch_beta1", 0 <= self.arch_beta1 < 1, "must be in [0, 1)"),
        ("arch_beta2", 0 <= self.arch_beta2 < 1, "must be in [0, 1)"),
        ("arch_weight_decay", self.arch_weight_decay >= 0, "must be 0 or more"),
        ("temperature_start", self.temperature_start > 0, "must be positive"),
        ("temperature_end", self.temperature_end > 0, "must be positive"),
        ("resource_weight", self.resource_weight >= 0, "must be 0 or more"),
        ("recompute_unit", self.recompute_unit in ("edge", "cell"),
         "must be edge or cell"),
        ("label_smoothing", 0.0 <= self.label_smoothing < 1.0,
         "must be in [0, 1)"),
        ("flops_weight", self.flops_weight >= 0, "must be 0 or more"),
        ("flops_target", self.flops_target >= 0,
         "must be 0 (no budget) or more"),
        ("early_stop_threshold", self.early_stop_threshold >= 0,
         "must be 0 or more"),
        # (Only DSNAS stops early; other methods must keep the default.)
        ("early_stop_threshold",
         self.method != "dsnas" or self.early_stop_on_logits or
         self.early_stop_threshold < 1,
         "must be below 1 when the gap is between probabilities (it never "
         "reaches 1); a larger threshold needs --early_stop_on_logits"),
        ("early_stop_every_steps", self.early_stop_every_steps >= 0,
         "must be 0 (every epoch) or more"),
        ("compiled_children", self.compiled_children >= 0, "must be 0 or more"),
        ("single_path_step", self.single_path_step in ("eager", "switch"),
         "must be eager or switch"),
    ]
    self._check(checks)
    if self.update_unsampled and self.method != "dsnas":
      raise ConfigError(
          "--update_unsampled is for DSNAS (the candidates a step did not "
          f"draw); got --method={self.method}")
    if self.single_path_step == "switch" and self.method != "dsnas":
      raise ConfigError(
          "--single_path_step=switch is a DSNAS step (one sampled op per "
          f"edge or block); got --method={self.method}")
    if self.w_lr_warmup_epochs >= self.epochs:
      raise ConfigError(
          f"--w_lr_warmup_epochs={self.w_lr_warmup_epochs} leaves no epoch "
          f"of the cosine schedule: keep it below --epochs={self.epochs}")
    if self.flops_target and not self.flops_weight:
      raise ConfigError(
          f"--flops_target={self.flops_target:g} is a budget for the FLOPs "
          "penalty: set --flops_weight > 0 too")
    shaped = [name for name in self.SHUFFLENET_SHAPE if getattr(self, name)]
    if shaped and self.space not in space_names.BLOCK_SPACES:
      raise ConfigError(
          f"--{shaped[0]} shapes the ShuffleNet spaces "
          f"{list(space_names.BLOCK_SPACES)}, not --space={self.space} (use "
          "--num_cells, --num_nodes and --channels for cell spaces)")

  #: Fields only some methods read (method → its fields; every method of
  #: ``tfnas.methods.METHODS`` has an entry, a test keeps them in step).
  #: A new run of another method must leave them at their defaults: set,
  #: they would be recorded in config.json as if they had taken effect
  #: (`check_method_fields`; saved configs of older runs still load).
  METHOD_FIELDS = {
      # Bi-level: α learns on the held-out part of the training split.
      "darts_1st": ("train_portion",),
      "darts_2nd": ("train_portion",),
      "snas": ("temperature_start", "temperature_end",
               "temperature_schedule", "resample_per_cell",
               "resource_weight", "resource_metric", "resource_gradient"),
      "dsnas": ("reward_normalization", "update_unsampled", "flops_weight",
                "flops_target", "early_stop_threshold",
                "early_stop_on_logits", "early_stop_every_steps",
                "compiled_children", "single_path_step"),
  }

  #: Fields that act only while another field of their method is on:
  #: field → (that field, its "off" value).
  COMPANION_FIELDS = {
      "resource_metric": ("resource_weight", 0.0),
      "resource_gradient": ("resource_weight", 0.0),
      "early_stop_on_logits": ("early_stop_threshold", 0.0),
      "early_stop_every_steps": ("early_stop_threshold", 0.0),
  }

  def check_method_fields(self) -> None:
    """Refuses a method-specific field set for a method that ignores it,
    and a companion field set while the feature it tunes is off
    (``COMPANION_FIELDS``).

    Checked for new runs (the search flags, `Search` when it starts a run),
    not in ``__init__``: a saved config.json of an older run that recorded
    such a value still loads for export, evaluation and resumption.

    Raises:
      ConfigError: naming the field and the methods that read it.
    """
    own = self.METHOD_FIELDS.get(self.method, ())
    defaults = {f.name: f.default for f in dataclasses.fields(self)}
    for names in self.METHOD_FIELDS.values():
      for name in names:
        value, default = getattr(self, name), defaults[name]
        if name in own or value == default:
          continue
        readers = sorted(m for m, n in self.METHOD_FIELDS.items()
                         if name in n)
        raise ConfigError(
            f"--{name}={value!r} is read only by --method="
            f"{' / '.join(readers)}; --method={self.method} ignores it "
            f"(leave it at its default, {default!r})")
    for name, (switch, off) in self.COMPANION_FIELDS.items():
      if (name in own and getattr(self, switch) == off and
          getattr(self, name) != defaults[name]):
        raise ConfigError(
            f"--{name}={getattr(self, name)!r} acts only with --{switch} "
            f"set, and --{switch}={off!r} turns that off")

  #: Overrides of a ShuffleNet space preset (see `shufflenet_overrides`).
  SHUFFLENET_SHAPE = ("stage_repeats", "stage_channels", "stem_channels",
                      "head_channels")

  def shufflenet_overrides(self) -> dict[str, Any]:
    """The ShuffleNet shape fields that were set (empty / 0: keep preset)."""
    return {name: getattr(self, name) for name in self.SHUFFLENET_SHAPE
            if getattr(self, name)}

  #: Fields that may differ between a run and its resumption.
  #: Recomputation changes memory and time, not the maths.
  RESUMABLE_CHANGES = ("epochs", "steps_per_loop", "checkpoint_every_steps",
                       "data_dir", "manual_dir", "recompute", "recompute_unit",
                       "compiled_children", "single_path_step")


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Config):
  """Everything a retraining run depends on (saved as ``config.json``).

  Defaults are the DARTS/SNAS CIFAR-10 evaluation recipe (SNAS appendix
  G.2): 20 cells, C=36, batch 96, SGD 0.025 cosine to 0, momentum 0.9,
  weight decay 3e-4, cutout 16, drop-path 0.2, auxiliary weight 0.4, 600
  epochs.
  """
  # Run.
  run_dir: str = "runs/train"
  seed: int = 0
  deterministic: bool = True
  sync_batch_norm: bool = False  # BN statistics over all replicas.
  epochs: int = 600
  max_steps_per_epoch: int = 0  # 0: the whole training split.
  steps_per_loop: int = 50
  checkpoint_every_steps: int = 0
  # Data (the whole training split trains; the test split evaluates).
  dataset: str = "cifar10"
  data_dir: str | None = None
  manual_dir: str | None = None
  batch_size: int = 96
  pad_crop: int = 4
  flip: bool = True
  cutout: int = 16
  # Network.
  genotype: str = "DARTS_V2"
  network: str = "cifar"
  num_cells: int = 20
  channels: int = 36
  auxiliary_weight: float = 0.4
  drop_path_prob: float = 0.2
  # Optimiser.
  lr: float = 0.025
  lr_min: float = 0.0
  lr_schedule: str = "cosine"
  lr_decay: float = 0.97  # Per epoch, for lr_schedule="exponential".
  momentum: float = 0.9
  weight_decay: float = 3e-4
  grad_clip: float = 5.0
  label_smoothing: float = 0.0

  def __post_init__(self):
    checks = self._loop_checks() + [
        ("num_cells", self.num_cells >= 1, "must be at least 1"),
        ("channels", self.channels >= 2 and self.channels % 2 == 0,
         "must be even and at least 2"),
        ("network", self.network in ("cifar", "imagenet"),
         "must be cifar or imagenet"),
        ("auxiliary_weight", self.auxiliary_weight >= 0, "must be 0 or more"),
        ("drop_path_prob", 0 <= self.drop_path_prob < 1, "must be in [0, 1)"),
        ("lr", self.lr > 0, "must be positive"),
        ("lr_min", 0 <= self.lr_min <= self.lr,
         f"must be between 0 and --lr={self.lr:g}"),
        ("lr_schedule", self.lr_schedule in ("cosine", "exponential"),
         "must be cosine or exponential"),
        ("lr_decay", 0 < self.lr_decay <= 1, "must be in (0, 1]"),
        ("momentum", 0 <= self.momentum < 1, "must be in [0, 1)"),
        ("weight_decay", self.weight_decay >= 0, "must be 0 or more"),
        ("grad_clip", self.grad_clip >= 0, "must be 0 (no clipping) or more"),
        ("label_smoothing", 0 <= self.label_smoothing < 1, "must be in [0, 1)"),
        ("genotype", bool(self.genotype), "must be given"),
    ]
    self._check(checks)

  #: Fields that may differ between a run and its resumption.
  RESUMABLE_CHANGES = ("epochs", "steps_per_loop", "checkpoint_every_steps",
                       "data_dir", "manual_dir")
