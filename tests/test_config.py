"""Run configs: every numeric flag is range-checked and config.json parsed
strictly (no TensorFlow needed)."""

import pytest

from tfnas.config import ConfigError, SearchConfig, TrainConfig


@pytest.mark.parametrize("cls, field, value", [
    # A negative interval made the loop's chunk size negative: it never ended.
    (SearchConfig, "checkpoint_every_steps", -1),
    (SearchConfig, "pad_crop", -2),
    (SearchConfig, "cutout", -1),
    (SearchConfig, "w_momentum", -0.5),
    (SearchConfig, "w_momentum", 1.0),
    (SearchConfig, "w_weight_decay", -1e-4),
    (SearchConfig, "grad_clip", -1.0),
    (SearchConfig, "w_lr_min", 0.5),  # Above --w_lr (0.025).
    (SearchConfig, "w_lr_warmup_epochs", -1),
    (SearchConfig, "arch_beta1", 1.0),
    (SearchConfig, "arch_beta2", -0.1),
    (SearchConfig, "arch_weight_decay", -1.0),
    (TrainConfig, "checkpoint_every_steps", -1),
    (TrainConfig, "pad_crop", -2),
    (TrainConfig, "cutout", -1),
    (TrainConfig, "momentum", -1.0),
    (TrainConfig, "weight_decay", -3e-4),
    (TrainConfig, "grad_clip", -5.0),
    # Keras and NumPy take seeds in [0, 2**32): a traceback before.
    (SearchConfig, "seed", -1),
    (SearchConfig, "seed", 2**32),
    (TrainConfig, "seed", -1),
    # An empty run directory wrote the run into the working directory.
    (SearchConfig, "run_dir", ""),
    (TrainConfig, "run_dir", " "),
    # A probability gap never reaches 1: early stop was silently off.
])
def test_out_of_range_values_name_their_flag(cls, field, value):
  # The message also says what the value must be.
  with pytest.raises(ConfigError,
                     match=rf"^invalid --{field}={value!r}: must \S"):
    cls(**{field: value})


def test_edge_seeds_and_logit_gap_thresholds_are_accepted():
  SearchConfig(seed=2**32 - 1)
  TrainConfig(seed=0)
  SearchConfig(method="dsnas", early_stop_threshold=2.0,
               early_stop_on_logits=True)
  with pytest.raises(ConfigError, match="read only by --method=dsnas"):
    SearchConfig(early_stop_threshold=2.0).check_method_fields()


def test_a_probability_gap_threshold_of_dsnas_is_below_one():
  # A probability gap never reaches 1: early stop was silently off.
  with pytest.raises(ConfigError, match=r"^invalid --early_stop_threshold="
                                        r"1\.0: must be below 1"):
    SearchConfig(method="dsnas", early_stop_threshold=1.0)


def test_a_bound_from_another_flag_names_it():
  with pytest.raises(ConfigError, match=r"^invalid --w_lr_min=0.5: must be "
                     r"between 0 and --w_lr=0.025$"):
    SearchConfig(w_lr_min=0.5)


def test_warm_up_must_leave_epochs_to_anneal():
  with pytest.raises(ConfigError, match=r"--w_lr_warmup_epochs=5 leaves no "
                     r"epoch .* below --epochs=5"):
    SearchConfig(epochs=5, w_lr_warmup_epochs=5)
  assert SearchConfig(epochs=5, w_lr_warmup_epochs=4).w_lr_warmup_epochs == 4


def test_switched_single_path_step_is_for_dsnas():
  for space in ("darts", "s3", "shufflenet", "shufflenet_small"):
    assert SearchConfig(method="dsnas", space=space,
                        single_path_step="switch").single_path_step == "switch"
  for method in ("snas", "darts"):
    with pytest.raises(ConfigError, match=r"--single_path_step=switch is a "
                       rf"DSNAS step .* got --method={method}$"):
      SearchConfig(method=method, space="darts", single_path_step="switch")
  with pytest.raises(ConfigError, match=r"^invalid --single_path_step='jit': "
                     r"must be eager or switch$"):
    SearchConfig(single_path_step="jit")


def test_update_unsampled_is_for_dsnas():
  assert SearchConfig(method="dsnas", update_unsampled=True).update_unsampled
  with pytest.raises(ConfigError, match=r"--update_unsampled is for DSNAS .* "
                     r"got --method=snas$"):
    SearchConfig(method="snas", update_unsampled=True)


def test_zero_turns_optional_terms_off():
  SearchConfig(w_momentum=0.0, w_weight_decay=0.0, grad_clip=0.0,
               arch_weight_decay=0.0, pad_crop=0, cutout=0, w_lr_min=0.0)
  TrainConfig(momentum=0.0, weight_decay=0.0, grad_clip=0.0, pad_crop=0,
              cutout=0)


@pytest.mark.parametrize("cls", [SearchConfig, TrainConfig])
def test_from_dict_refuses_what_is_not_a_config(cls):
  for saved in ([1, 2], None, "text"):
    with pytest.raises(ConfigError, match="must be a JSON object"):
      cls.from_dict(saved)
  with pytest.raises(ConfigError, match="unknown config keys"):
    cls.from_dict({"no_such_key": 1})
  with pytest.raises(ConfigError, match="config values of the wrong type"):
    cls.from_dict({"num_cells": "abc"})
  assert cls.from_dict(cls().to_dict()) == cls()


def test_flops_target_needs_the_penalty():
  with pytest.raises(ConfigError, match="--flops_target=300 .*--flops_weight"):
    SearchConfig(method="dsnas", flops_target=300.0)
  with pytest.raises(ConfigError, match=r"^invalid --flops_target=-1.0: "
                     r"must be 0 \(no budget\) or more$"):
    SearchConfig(method="dsnas", flops_target=-1.0, flops_weight=0.1)
  SearchConfig(method="dsnas", flops_target=300.0, flops_weight=0.1)


@pytest.mark.parametrize("method,field,value,readers", [
    ("dsnas", "resource_weight", 0.5, "snas"),
    ("dsnas", "temperature_start", 5.0, "snas"),
    ("darts_1st", "resource_weight", 0.5, "snas"),
    ("snas", "flops_weight", 0.5, "dsnas"),
    ("snas", "reward_normalization", True, "dsnas"),
    ("snas", "early_stop_threshold", 0.5, "dsnas"),
    ("darts_2nd", "compiled_children", 3, "dsnas"),
    ("snas", "train_portion", 0.3, "darts_1st / darts_2nd"),
    ("dsnas", "train_portion", 0.3, "darts_1st / darts_2nd"),
])
def test_a_field_of_another_method_is_refused(method, field, value, readers):
  # Accepted silently, it was recorded in config.json as if it had acted.
  with pytest.raises(ConfigError, match=(
      rf"^--{field}={value!r} is read only by --method={readers}; "
      rf"--method={method} ignores it")):
    SearchConfig(method=method, **{field: value}).check_method_fields()


def test_a_saved_config_of_an_older_run_with_such_a_field_still_loads():
  # Runs written before the check recorded such values; their config.json
  # must still load for export, evaluation and resumption.
  saved = SearchConfig(method="dsnas", train_portion=0.8).to_dict()
  assert SearchConfig.from_dict(saved).train_portion == 0.8


def test_every_method_accepts_its_own_fields():
  from tfnas import flags as tfnas_flags
  assert sorted(SearchConfig.METHOD_FIELDS) == sorted(tfnas_flags.METHODS)
  SearchConfig(method="snas", temperature_start=5.0, resource_weight=0.5,
               resample_per_cell=True,
               resource_metric="flops").check_method_fields()
  SearchConfig(method="dsnas", flops_weight=0.5, reward_normalization=True,
               early_stop_threshold=0.1,
               compiled_children=3).check_method_fields()
  SearchConfig(method="darts_2nd", train_portion=0.3).check_method_fields()
  # Defaults are fine everywhere (0.3 is DSNAS's default threshold).
  for method in SearchConfig.METHOD_FIELDS:
    SearchConfig(method=method).check_method_fields()


@pytest.mark.parametrize("field", ["w_lr", "resource_weight",
                                   "temperature_end"])
def test_infinite_values_are_refused(field):
  # inf passed ">= 0" and failed minutes later as a diverged search.
  method = "snas" if field != "w_lr" else "darts_1st"
  with pytest.raises(ConfigError, match=(rf"^invalid --{field}=inf: must be "
                                         r"a finite number$")):
    SearchConfig(method=method, **{field: float("inf")})
  with pytest.raises(ConfigError, match=r"^invalid --lr=-inf: must be a "
                                        r"finite number$"):
    TrainConfig(lr=float("-inf"))


@pytest.mark.parametrize("method,field,value,switch", [
    ("snas", "resource_metric", "flops", "resource_weight"),
    ("snas", "resource_gradient", "exact", "resource_weight"),
    ("dsnas", "early_stop_on_logits", True, "early_stop_threshold"),
    ("dsnas", "early_stop_every_steps", 5, "early_stop_threshold"),
])
def test_a_companion_of_a_feature_that_is_off_is_refused(method, field,
                                                          value, switch):
  with pytest.raises(ConfigError, match=(
      rf"^--{field}={value!r} acts only with --{switch} set, and "
      rf"--{switch}=0.0 turns that off$")):
    SearchConfig(method=method, **{field: value,
                                   switch: 0.0}).check_method_fields()
  # With the feature on, the companion is fine.
  SearchConfig(method=method, **{field: value,
                                 switch: 0.5}).check_method_fields()


@pytest.mark.parametrize("cls, field, value", [
    (SearchConfig, "train_portion", 1.0),
    (SearchConfig, "train_portion", 0.0),
    (TrainConfig, "lr_decay", 0.0),
    (TrainConfig, "drop_path_prob", 1.0),
])
def test_open_interval_ends_are_refused(cls, field, value):
  with pytest.raises(ConfigError,
                     match=rf"^invalid --{field}={value!r}: must \S"):
    cls(**{field: value})


def test_odd_search_channels_are_refused_in_process():
  with pytest.raises(ConfigError, match=r"^invalid --channels=5: must be "
                                        r"even"):
    SearchConfig(channels=5)
