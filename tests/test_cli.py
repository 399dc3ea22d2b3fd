"""tfnas-search end to end on digits, and its bad-input errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from tensorboard.backend.event_processing import event_accumulator

from tfnas.genotype import Genotype

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# S3 (none, skip, sep_conv_3x3) traces in a third of the DARTS space's time.
TINY = ["--dataset=digits", "--space=s3", "--num_cells=3", "--num_nodes=2",
        "--channels=4", "--batch_size=32", "--max_steps_per_epoch=2",
        "--steps_per_loop=2", "--noprogress"]


def search(*args, timeout=300):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
  return subprocess.run(
      [sys.executable, "-m", "tfnas.apps.search", *args], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=timeout)


def error_line(proc):
  """The error message: stderr must be at most a line plus absl's hint."""
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert 1 <= len(lines) <= 2, proc.stderr[-3000:]
  return lines[0]


@pytest.mark.slow
def test_end_to_end_writes_events_checkpoint_genotype(tmp_path):
  run_dir = tmp_path / "run"
  proc = search(f"--flagfile={ROOT}/flags/darts_digits.cfg", *TINY,
                "--epochs=2", f"--run_dir={run_dir}",
                "--intra_op_threads=1", "--inter_op_threads=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  genotype = Genotype.load(run_dir / "genotype.json")
  assert genotype.normal.num_nodes == 2
  assert (run_dir / "config.json").exists()
  assert any(f.startswith("ckpt-") for f in os.listdir(run_dir / "ckpt"))
  events = event_accumulator.EventAccumulator(
      str(run_dir / "tb"), size_guidance={"tensors": 0})
  events.Reload()
  tags = set(events.Tags()["tensors"])
  for tag in ("train/loss", "train/acc", "val/loss", "val/acc", "train/lr",
              "arch/entropy", "arch/normal/edge_0/sep_conv_3x3",
              "arch/genotype"):
    assert tag in tags, (tag, sorted(tags)[:20])
  assert len(events.Tensors("train/loss")) == 2  # One per epoch.
  assert "node 2" in proc.stdout
  # Epoch lines come without absl's prefix (date, thread, source line).
  assert any(line.startswith("epoch 2: train/loss=")
             for line in proc.stderr.splitlines()), proc.stderr[-3000:]
  _existing_run_dir_is_not_overwritten(run_dir)


def _existing_run_dir_is_not_overwritten(run_dir):
  """Another search into a finished run's directory changes nothing in it
  (checked on the end-to-end run: it needs a run directory to exist)."""
  snapshot = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
  again = search(*TINY, "--epochs=1", "--channels=6", f"--run_dir={run_dir}")
  assert again.returncode == 2
  assert "already holds a run" in error_line(again)
  other = search(*TINY, "--epochs=1", "--channels=6", "--resume",
                 f"--run_dir={run_dir}")
  assert other.returncode == 2
  assert "different config" in error_line(other)
  assert {p: p.read_bytes() for p in run_dir.rglob("*")
          if p.is_file()} == snapshot


@pytest.mark.slow
def test_sigterm_saves_and_resume_finishes(tmp_path):
  run_dir = tmp_path / "run"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
  # One node per cell: two processes trace the supernet here.
  args = [sys.executable, "-m", "tfnas.apps.search", *TINY, "--num_nodes=1",
          "--epochs=50", "--max_steps_per_epoch=4", "--steps_per_loop=1",
          f"--run_dir={run_dir}"]
  proc = subprocess.Popen(args, cwd=ROOT, env=env, stderr=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while time.time() < deadline and not (run_dir / "history.jsonl").exists():
    time.sleep(0.5)
  assert (run_dir / "history.jsonl").exists(), "no epoch finished"
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
  # Said by the handler, or, when TensorFlow held the main thread for a
  # while (a slow machine), at once by the watcher thread.
  assert ("SIGTERM: stopping with a checkpoint after this chunk" in err or
          "SIGTERM arrived while TensorFlow runs a compiled call" in err), (
              err[-2000:])
  assert f"{run_dir} holds the last checkpoint: rerun with --resume" in err
  assert err.count("--resume") == 1, err[-2000:]  # Said once, by the app.
  epochs_done = len((run_dir / "history.jsonl").read_text().splitlines())
  assert f"stopped: state saved in {run_dir} ({epochs_done} of 50 " in err
  assert epochs_done < 50
  resumed = search(*TINY, "--num_nodes=1", "--epochs=50",
                   "--max_steps_per_epoch=4", f"--run_dir={run_dir}",
                   "--resume", "--epochs=" + str(epochs_done + 1))
  # --epochs may change on resume; the run continues to the new end.
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert len((run_dir / "history.jsonl").read_text().splitlines()) == (
      epochs_done + 1)
  assert '"epochs": %d' % (epochs_done + 1) in (
      run_dir / "config.json").read_text()
  assert "final: val/acc=" in resumed.stdout
  assert (f"next: retrain the derived cell: tfnas-train "
          f"--flagfile=flags/train_digits.cfg --genotype={run_dir} ") in (
              resumed.stdout)
  # Resuming a finished run says so and repeats its final metrics.
  again = search(*TINY, "--num_nodes=1", f"--run_dir={run_dir}", "--resume",
                 "--max_steps_per_epoch=4", "--epochs=" + str(epochs_done + 1))
  assert again.returncode == 0, again.stderr[-2000:]
  assert (f"{run_dir} already finished {epochs_done + 1} epochs "
          f"(--epochs={epochs_done + 1}); resume with a larger --epochs"
          ) in again.stdout
  assert resumed.stdout.splitlines()[-1] == again.stdout.splitlines()[-1]


def test_sigterm_before_the_first_step_is_one_line(tmp_path):
  # While the supernet is built and traced (seconds to minutes), before the
  # loop's own handler: the default action killed the process silently.
  run_dir = tmp_path / "run"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
  proc = subprocess.Popen(
      [sys.executable, "-m", "tfnas.apps.search", *TINY, "--epochs=1",
       f"--run_dir={run_dir}"], cwd=ROOT, env=env, stderr=subprocess.PIPE,
      stdout=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while time.time() < deadline and not (run_dir / "config.json").exists():
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
  assert "Traceback" not in err
  assert (f"interrupted before the first checkpoint; rerun with --resume to "
          f"start {run_dir} over") in err
  assert not (run_dir / "ckpt").exists()


def test_the_interrupt_line_says_what_a_rerun_continues(tmp_path):
  from tfnas.apps import common
  run = tmp_path / "run"
  assert common.interrupted_line(None) == "interrupted"
  assert "nothing was saved" in common.interrupted_line(str(run))
  run.mkdir()
  (run / "config.json").write_text("{}")
  assert "before the first checkpoint; rerun with --resume to start" in (
      common.interrupted_line(str(run)))
  (run / "ckpt").mkdir()
  (run / "ckpt" / "checkpoint").write_text("")
  assert common.interrupted_line(str(run)) == (
      f"interrupted; {run} holds the last checkpoint: rerun with --resume "
      "to continue")


@pytest.mark.parametrize("args, fragment", [
    (["--dataset=imagenet7"], "--dataset"),
    (["--method=random_walk"], "--method"),
    (["--flagfile=/nonexistent/x.cfg"], "x.cfg"),
    (["--train_portion=1.5"], "train_portion"),
    (["--channels=5"], "channels"),
    (["--stage_repeats=1,x"], "--stage_repeats"),
    (["--stage_channels=8,16"], "--stage_channels shapes the ShuffleNet"),
    (["--intra_op_threads=-1"], "--intra_op_threads"),
    (["--flagfile=flags/no_such.cfg"], "relative to the working directory"),
    (["--resource_weight=0.5"], "--resource_weight=0.5 is read only by "
     "--method=snas"),
    (["--cpu_replicas=-1"], "--cpu_replicas"),
])
def test_bad_flags_give_one_clear_line(tmp_path, args, fragment):
  proc = search(*TINY, f"--run_dir={tmp_path}/r", *args)
  assert proc.returncode != 0
  assert fragment in error_line(proc), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "r" / "ckpt").exists()


THREADS_PROBE = """
from tfnas.apps import startup
from tfnas.errors import TfnasError
tf, _ = startup.start_tensorflow("default", ({intra}, {inter}))
print(tf.config.threading.get_intra_op_parallelism_threads(),
      tf.config.threading.get_inter_op_parallelism_threads())
startup.import_tensorflow(threads=({intra}, {inter}))  # Same sizes: fine.
try:
  startup.import_tensorflow(threads=(7, 0))
except TfnasError as e:
  print(e)
"""


@pytest.mark.parametrize("intra, inter", [(1, 3), (0, 2), (0, 0)])
def test_thread_flags_size_tensorflows_pools_before_it_starts(intra, inter):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
  proc = subprocess.run(
      [sys.executable, "-c", THREADS_PROBE.format(intra=intra, inter=inter)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  sizes, refusal = proc.stdout.strip().splitlines()
  assert sizes == f"{intra} {inter}"  # 0: TensorFlow's default, untouched.
  assert refusal.startswith("--intra_op_threads=7 must be set before "
                            "TensorFlow starts"), refusal


def test_unprepared_tfds_dataset_fails_fast(tmp_path):
  start = time.time()
  proc = search(*TINY, "--dataset=cifar10", f"--data_dir={tmp_path}/tfds",
                f"--run_dir={tmp_path}/r")
  assert time.time() - start < 60
  assert proc.returncode == 2
  assert "--data_dir" in error_line(proc)
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("app, doc, flag", [
    ("search", "tfnas-search: architecture search", "--flagfile=flags/"),
    ("train", "tfnas-train", "--genotype"),
    ("export", "tfnas-export", "--export_dir"),
])
def test_help_of_an_installed_entry_point_lists_its_flags(app, doc, flag):
  # An installed entry point is a generated script: its __main__ has no
  # docstring and defines no flags, as with `python -c`.
  entry = (f"import sys; sys.argv[0] = 'tfnas-{app}'; "
           f"from tfnas.apps.{app} import run; run()")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
  for asked in ("--helpshort", "-h"):
    proc = subprocess.run([sys.executable, "-c", entry, asked],
                          cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 0  # Help asked for is no error.
    assert doc in proc.stdout  # The app's docstring as its usage.
    assert flag in proc.stdout
    assert proc.stdout.count("\n  --") > 5  # The app's flags, not none.


def test_a_flagfile_given_without_its_flag_is_a_short_error():
  # absl printed the whole help (hundreds of lines) before the error.
  proc = search("flags/darts_digits.cfg", timeout=120)
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 2, proc.stderr[-3000:]
  assert "unexpected arguments ['flags/darts_digits.cfg']" in lines[0]
  assert "pass --flagfile=flags/darts_digits.cfg" in lines[0]
  assert proc.stdout == ""


def test_final_line_of_a_finished_run_names_its_epochs(tmp_path, capsys):
  from tfnas.apps import common
  (tmp_path / "history.jsonl").write_text(
      "".join(json.dumps({"epoch": e, "val/acc": 0.5}) + "\n"
              for e in (1, 2, 3)))
  common.print_final([], str(tmp_path), 2, ("val/acc",))
  out = capsys.readouterr().out.splitlines()
  assert out[0] == (f"{tmp_path} already finished 3 epochs (--epochs=2); "
                    "resume with a larger --epochs to train longer")
  assert out[1] == f"final: val/acc=0.5000; run directory: {tmp_path}"
  common.print_final([], str(tmp_path), 2, ("val/acc",), "tfnas-train ...")
  assert capsys.readouterr().out.splitlines()[-1] == "next: tfnas-train ..."


def test_the_next_step_after_a_run():
  from tfnas.apps import common
  assert common.next_step("runs/darts_digits/", "retrain", "digits") == (
      "retrain the derived cell: tfnas-train "
      "--flagfile=flags/train_digits.cfg --genotype=runs/darts_digits/ "
      "--run_dir=runs/darts_digits_train")
  assert common.next_step("runs/p", "retrain", "npz:/d/p.npz") == (
      "retrain the derived cell: tfnas-train --dataset=npz:/d/p.npz "
      "--genotype=runs/p --run_dir=runs/p_train")
  assert common.next_step("runs/ds", "export") == (
      "deploy the searched child: tfnas-export --run_dir=runs/ds "
      "--export_dir=exports/ds")
  assert common.next_step("runs/t", "serve") == (
      "export it for TF Serving: tfnas-export --run_dir=runs/t "
      "--export_dir=exports/t")
