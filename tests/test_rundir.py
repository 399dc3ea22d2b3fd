"""Run directories: what a resumption must match (no TensorFlow needed)."""

import json
import os
import stat

import pytest

from tfnas.config import SearchConfig, TrainConfig
from tfnas.train import rundir


def test_resume_compares_values_as_json_and_old_runs_by_default(tmp_path):
  run_dir = tmp_path / "r"
  config = {"space": "shufflenet_small", "stage_repeats": (1, 2), "epochs": 1}
  assert not rundir.prepare(str(run_dir), config, resume=False)
  saved = json.loads((run_dir / "config.json").read_text())
  assert saved["stage_repeats"] == [1, 2]
  # The saved list equals the config's tuple.
  assert rundir.prepare(str(run_dir), dict(config, epochs=3), resume=True,
                        allowed_changes=("epochs",))
  assert json.loads((run_dir / "config.json").read_text())["epochs"] == 3
  # A run written before a key existed resumes when the key keeps its
  # default, and not when it is set to something else.
  config["epochs"] = 3
  newer = dict(config, head_channels=0)
  with pytest.raises(rundir.RunDirError, match=r"head_channels: None -> 0"):
    rundir.prepare(str(run_dir), newer, resume=True)
  assert rundir.prepare(str(run_dir), newer, resume=True,
                        defaults={"head_channels": 0})
  with pytest.raises(rundir.RunDirError, match=r"head_channels: 0 -> 8"):
    rundir.prepare(str(run_dir), dict(newer, head_channels=8), resume=True)
  with pytest.raises(rundir.RunDirError,
                     match=r"different config \(stage_repeats: \[1, 2\] -> "
                     r"\[1, 1\]\)"):
    rundir.prepare(str(run_dir), dict(newer, stage_repeats=(1, 1)),
                   resume=True)


def test_resume_with_fewer_epochs_than_finished_keeps_the_runs_epochs(
    tmp_path):
  run_dir = tmp_path / "r"
  rundir.prepare(str(run_dir), {"epochs": 50}, resume=False)
  (run_dir / "history.jsonl").write_text(
      "".join(json.dumps({"epoch": e}) + "\n" for e in (1, 2, 3)))

  def resume(epochs):
    rundir.prepare(str(run_dir), {"epochs": epochs}, resume=True,
                   allowed_changes=("epochs",))
    return json.loads((run_dir / "config.json").read_text())["epochs"]
  # Fewer than the 3 finished: nothing runs, the run's 50 stay recorded.
  assert resume(2) == 50
  # At least as many as finished: the run's new length.
  assert resume(10) == 10
  assert resume(3) == 3


def test_resume_with_other_epochs_warns_that_schedules_stretch(
    tmp_path, caplog):
  run_dir = tmp_path / "r"
  rundir.prepare(str(run_dir), {"epochs": 2}, resume=False)

  def resume(epochs):
    caplog.clear()
    rundir.prepare(str(run_dir), {"epochs": epochs}, resume=True,
                   allowed_changes=("epochs",))
    return [r.getMessage() for r in caplog.records
            if r.levelname == "WARNING"]
  assert resume(2) == []
  warned = resume(3)
  assert len(warned) == 1
  assert warned[0].startswith("--epochs=3 changes the run's planned 2: "
                              "schedules computed over the whole run")
  assert resume(3) == []  # 3 is now the plan.


def test_worker_scratch_writes_outside_the_run_and_needs_it_to_resume(
    tmp_path, monkeypatch):
  monkeypatch.setattr(rundir.tempfile, "tempdir", str(tmp_path / "tmp"))
  (tmp_path / "tmp").mkdir()
  run_dir = tmp_path / "r"
  scratch = rundir.worker_scratch(str(run_dir), resume=False, worker="worker1")
  assert scratch.startswith(str(tmp_path / "tmp" / "tfnas-worker1-"))
  assert not run_dir.exists()
  # Resuming restores the chief's checkpoint: the run must be visible.
  with pytest.raises(rundir.RunDirError,
                     match=r"worker1: --resume .* same --run_dir on a shared"):
    rundir.worker_scratch(str(run_dir), resume=True, worker="worker1")
  assert not rundir.prepare(str(run_dir), {"epochs": 1}, resume=False)
  assert rundir.worker_scratch(str(run_dir), resume=True, worker="worker1")


def test_a_run_dir_that_is_a_file_is_refused_and_kept(tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text("mine")
  for resume in (False, True):
    with pytest.raises(rundir.RunDirError, match="is a file, not a directory"):
      rundir.prepare(str(path), {"a": 1}, resume=resume)
  assert path.read_text() == "mine"


def test_a_run_dir_under_a_file_is_one_clear_error(tmp_path):
  (tmp_path / "afile").write_text("mine")
  with pytest.raises(rundir.RunDirError,
                     match=r"cannot write the run to --run_dir .*afile/sub: "
                           r"Not a directory; choose another"):
    rundir.prepare(str(tmp_path / "afile" / "sub"), {"a": 1}, resume=False)
  assert (tmp_path / "afile").read_text() == "mine"


def test_the_same_run_resumes_under_another_spelling_or_place(tmp_path):
  run = tmp_path / "r"
  assert not rundir.prepare(str(run), {"run_dir": str(run), "a": 1},
                            resume=False)
  # A trailing slash, or the run moved: the directory is the run.
  for where in (str(run) + "/", str(tmp_path / "moved")):
    if where.endswith("moved"):
      os.rename(run, where)
    assert rundir.prepare(where, {"run_dir": where, "a": 1}, resume=True)
    assert json.loads(open(os.path.join(where, "config.json")).read())[
        "run_dir"] == where
  with pytest.raises(rundir.RunDirError, match=r"different config \(a: 1 -> 2"):
    rundir.prepare(where, {"run_dir": where, "a": 2}, resume=True)


def test_resume_names_a_run_of_the_other_command_and_few_keys(tmp_path):
  search = {"run_dir": str(tmp_path), "method": "darts_1st", "w_lr": 0.1}
  rundir.prepare(str(tmp_path), search, resume=False)
  with pytest.raises(rundir.RunDirError,
                     match=r"holds a tfnas-search run, not a tfnas-train "
                           r"run; choose another --run_dir$"):
    rundir.prepare(str(tmp_path), {"genotype": "DARTS_V2"}, resume=True)
  many = dict(search, **{f"k{i:02d}": i for i in range(12)})
  with pytest.raises(rundir.RunDirError) as refused:
    rundir.prepare(str(tmp_path), many, resume=True)
  message = str(refused.value)
  assert "k00: None -> 0" in message and "k07: None -> 7" in message
  assert "k08" not in message and "and 4 more" in message


@pytest.mark.parametrize("saved", ["[1]", "null", '"text"'])
def test_resume_refuses_a_config_json_that_is_not_an_object(tmp_path, saved):
  (tmp_path / "config.json").write_text(saved)
  with pytest.raises(rundir.RunDirError, match="not a run config"):
    rundir.prepare(str(tmp_path), {"a": 1}, resume=True)
  assert (tmp_path / "config.json").read_text() == saved


def test_atomic_write_gives_the_mode_of_a_plain_new_file(tmp_path):
  old = os.umask(0o027)
  try:
    rundir.atomic_write(str(tmp_path / "run" / "config.json"), "{}")
    (tmp_path / "plain").write_text("")
  finally:
    os.umask(old)
  mode = stat.S_IMODE(os.stat(tmp_path / "run" / "config.json").st_mode)
  assert mode == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode) == 0o640


@pytest.mark.parametrize("changes", [
    dict(recompute=True), dict(recompute=True, recompute_unit="cell"),
    dict(method="dsnas", compiled_children=0),
    dict(method="dsnas", single_path_step="switch"),
    dict(data_dir="/elsewhere", manual_dir="/archives", epochs=9)])
def test_search_resume_accepts_its_resumable_changes(tmp_path, changes):
  method = changes.get("method", "darts_1st")
  saved = SearchConfig(method=method, epochs=3).to_dict()
  rundir.prepare(str(tmp_path), saved, resume=False)
  changed = SearchConfig(**dict(changes, method=method)).to_dict()
  assert rundir.prepare(str(tmp_path), changed, resume=True,
                        allowed_changes=SearchConfig.RESUMABLE_CHANGES,
                        defaults=SearchConfig().to_dict())


@pytest.mark.parametrize("cls, field, value", [
    (SearchConfig, "train_portion", 0.6), (SearchConfig, "seed", 1),
    (TrainConfig, "channels", 8), (TrainConfig, "seed", 1)])
def test_resume_refuses_a_change_of_the_maths(tmp_path, cls, field, value):
  rundir.prepare(str(tmp_path), cls().to_dict(), resume=False)
  with pytest.raises(rundir.RunDirError, match=rf"different config \({field}"):
    rundir.prepare(str(tmp_path), cls(**{field: value}).to_dict(),
                   resume=True, allowed_changes=cls.RESUMABLE_CHANGES,
                   defaults=cls().to_dict())


def test_train_resume_accepts_other_data_locations(tmp_path):
  rundir.prepare(str(tmp_path), TrainConfig().to_dict(), resume=False)
  assert rundir.prepare(
      str(tmp_path), TrainConfig(data_dir="/d", manual_dir="/m").to_dict(),
      resume=True, allowed_changes=TrainConfig.RESUMABLE_CHANGES,
      defaults=TrainConfig().to_dict())


@pytest.mark.parametrize("first, second", [
    ({}, dict(stage_channels=(16, 32, 64, 128), stem_channels=8)),
    (dict(stage_repeats=(1, 1, 2, 1), head_channels=128), {})])
def test_search_resume_takes_a_preset_value_spelt_out_as_the_preset(
    tmp_path, first, second):
  # shufflenet_small's own shape, given by flags or left to the preset.
  from tfnas.train import search
  rules = search._RESUME_RULES  # pylint: disable=protected-access
  config = lambda **shape: SearchConfig(
      method="dsnas", space="shufflenet_small", **shape).to_dict()
  rundir.prepare(str(tmp_path), config(**first), resume=False)
  assert rundir.prepare(str(tmp_path), config(**second), resume=True,
                        respelled=("dataset",), **rules)
  # config.json keeps the shape as the run spelt it.
  saved, started = rundir.read_config(str(tmp_path)), config(**first)
  shape = SearchConfig.SHUFFLENET_SHAPE
  assert ({k: saved[k] for k in shape} ==
          json.loads(json.dumps({k: started[k] for k in shape})))
  # Another shape is another run, named by the values it compares.
  with pytest.raises(rundir.RunDirError,
                     match=r"stage_channels: \[16, 32, 64, 128\] -> "
                           r"\[16, 32, 64, 96\]"):
    rundir.prepare(str(tmp_path), config(stage_channels=(16, 32, 64, 96)),
                   resume=True, **rules)


def test_a_damaged_config_names_how_to_resume(tmp_path):
  # Its checkpoints may be intact: put the file back, not only "elsewhere".
  (tmp_path / "ckpt").mkdir()
  (tmp_path / "config.json").write_text('{"method": "darts_1st", ')
  with pytest.raises(rundir.RunDirError,
                     match=r"cannot read .*config.json .*put it back \(a new "
                           r"run with the run's flags writes the same file"):
    rundir.prepare(str(tmp_path), SearchConfig().to_dict(), resume=True)
