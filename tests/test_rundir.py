"""Run directories: what a resumption must match (no TensorFlow needed)."""

import json

import pytest

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
