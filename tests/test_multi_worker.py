"""MultiWorkerMirroredStrategy: 2 worker processes on 127.0.0.1 take the same
DARTS step as the default strategy on the same global batch, and
``tfnas-search --strategy=multi_worker`` writes one run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfnas import distribute
from tfnas.apps import startup
from tfnas.estimators.darts import DartsFirstOrder
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_ports(n):
  socks = [socket.socket() for _ in range(n)]
  for s in socks:
    s.bind(("127.0.0.1", 0))
  ports = [s.getsockname()[1] for s in socks]
  for s in socks:
    s.close()
  return ports


def _tf_config(workers, index):
  return json.dumps({"cluster": {"worker": workers},
                     "task": {"type": "worker", "index": index}})


def _run_workers(tmp_path, method, init):
  """Runs tests/multi_worker_step.py METHOD as 2 workers from ``init``;
  returns each worker's saved values."""
  init_path = tmp_path / "init.npz"
  np.savez(init_path, values=np.array(init, dtype=object))
  workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
  procs = []
  for index in range(2):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", INIT_PATH=str(init_path),
               TF_CONFIG=_tf_config(workers, index))
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests", "multi_worker_step.py"),
         method, str(tmp_path / f"out{index}.npz")], env=env, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  for proc in procs:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
  outputs = []
  for index in range(2):
    got = np.load(tmp_path / f"out{index}.npz")
    outputs.append([got[f"arr_{i}"] for i in range(len(init))])
  return outputs


def _assert_workers_equal(expected, init, outputs):
  moved = max(np.abs(a - b).max() for a, b in zip(expected, init))
  assert moved > 1e-4
  for values in outputs:
    for a, b in zip(expected, values):
      np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_two_workers_equal_default_strategy(tmp_path):
  ctx = helpers.tiny_context(space=helpers.replica_space(), global_batch=4)
  init = [v.numpy() for v in ctx.weight_variables + ctx.arch_variables]
  DartsFirstOrder().step(ctx, helpers.batch(seed=1), helpers.batch(seed=2),
                         tf.constant(0, tf.int64))
  expected = [v.numpy() for v in ctx.weight_variables + ctx.arch_variables]
  _assert_workers_equal(expected, init, _run_workers(tmp_path, "darts", init))
  # Every worker answers alike whether the workers passed the same key.
  for index in range(2):
    same = json.loads((tmp_path / f"out{index}.npz.same.json").read_text())
    assert same == [True, False]


@pytest.mark.slow
def test_two_workers_dsnas_steps_equal_two_local_replicas(tmp_path):
  # An eager single-path step: weight and gate gradients and synchronized
  # BN statistics all-reduced eagerly across the two processes give exactly
  # what two replicas in one process give (whose equality with one device
  # is tests/test_dsnas.py::MirroredDsnasStepTest). The start values are
  # those after one single-device step (any values would do).
  keras.utils.set_random_seed(0)
  init = helpers.dsnas_block_steps(tf.distribute.get_strategy())
  expected = helpers.dsnas_block_steps(
      distribute.mirrored_strategy(["/cpu:0", "/cpu:1"]), init)
  outputs = _run_workers(tmp_path, "dsnas", init)
  assert max(np.abs(a - b).max() for a, b in zip(expected, init)) > 1e-4
  for values in outputs:
    for a, b in zip(expected, values):
      np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cluster, task_type, task_id, expected", [
    ({"worker": ["a:1", "b:2"]}, "worker", 0, None),
    ({"worker": ["a:1", "b:2"]}, "worker", 1, "worker1"),
    ({"chief": ["c:3"], "worker": ["a:1"]}, "chief", 0, None),
    ({"chief": ["c:3"], "worker": ["a:1"]}, "worker", 0, "worker0"),
])
def test_the_chief_writes_the_run(cluster, task_type, task_id, expected):
  resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
      tf.train.ClusterSpec(cluster), task_type=task_type, task_id=task_id)

  class Strategy:
    cluster_resolver = resolver
  assert distribute.worker_name(Strategy()) == expected
  assert distribute.num_workers(Strategy()) == sum(map(len, cluster.values()))
  assert distribute.worker_name(tf.distribute.get_strategy()) is None
  assert distribute.num_workers(tf.distribute.get_strategy()) == 1


def test_mirrored_on_one_device_says_it_runs_one_replica(caplog,
                                                        monkeypatch):
  from tfnas.apps import startup
  # This process has two logical CPUs (conftest): quiet.
  assert startup.make_strategy("mirrored").num_replicas_in_sync == 2
  assert "found one device" not in caplog.text
  # A machine with one device (what tfnas-search sees on one CPU).
  monkeypatch.setattr(distribute, "mirrored_strategy",
                      lambda: distribute.tf.distribute.MirroredStrategy(
                          ["/cpu:0"]))
  assert startup.make_strategy("mirrored").num_replicas_in_sync == 1
  assert "--strategy=mirrored found one device (" in caplog.text
  assert "running one replica" in caplog.text


def _start_search_workers(tmp_path, *args):
  """Starts tfnas-search as 2 workers on 127.0.0.1 (tiny S3 space)."""
  workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
  scratch = tmp_path / "tmp"
  scratch.mkdir(exist_ok=True)
  procs = []
  for index in range(2):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3",
               TMPDIR=str(scratch), TF_CONFIG=_tf_config(workers, index))
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "tfnas.apps.search", "--strategy=multi_worker",
         "--dataset=digits", "--space=s3", "--num_cells=3", "--num_nodes=1",
         "--channels=4", "--batch_size=32", "--max_steps_per_epoch=2",
         "--steps_per_loop=1", "--noprogress", *args], env=env, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  return procs


def _finish(tmp_path, procs, returncode):
  """Both workers' (stdout, stderr) once they exit with ``returncode``."""
  outputs = [proc.communicate(timeout=600) for proc in procs]
  for proc, (_, err) in zip(procs, outputs):
    assert proc.returncode == returncode, err[-3000:]
  # The non-chief worker's scratch directory is gone.
  assert not [p.name for p in (tmp_path / "tmp").iterdir()
              if p.name.startswith("tfnas")]
  return outputs


@pytest.mark.slow
def test_cli_search_on_two_workers_writes_one_run_and_resumes(tmp_path):
  run_dir = tmp_path / "run"
  history = run_dir / "history.jsonl"
  procs = _start_search_workers(tmp_path, "--epochs=50",
                                f"--run_dir={run_dir}")
  deadline = time.time() + 300
  while time.time() < deadline and not history.exists():
    time.sleep(0.5)
  assert history.exists(), "no epoch finished"
  # SIGTERM reaches only the non-chief worker: both still stop after the
  # same chunk and save (a worker stopping alone would leave the other in
  # its next all-reduce).
  procs[1].send_signal(signal.SIGTERM)
  # Both exit as stopped by SIGTERM (the chief by the other's request).
  outputs = _finish(tmp_path, procs, returncode=128 + signal.SIGTERM)
  for _, err in outputs:
    assert "--resume" in err, err[-2000:]
  epochs_done = len(history.read_text().splitlines())  # Only the chief's.
  assert 1 <= epochs_done < 50
  # A stop between chunks saves the epoch's metric sums so far; one that
  # came during an evaluation stops both after it, at the epoch's end.
  assert set(os.listdir(run_dir)) - {"partial_epoch.json"} == {
      "arch.json", "ckpt", "config.json", "genotype.json", "history.jsonl",
      "tb"}
  # Both resume from the chief's checkpoint and finish one more epoch.
  outputs = _finish(tmp_path, _start_search_workers(
      tmp_path, f"--epochs={epochs_done + 1}", "--resume",
      f"--run_dir={run_dir}"), returncode=0)
  for _, err in outputs:
    assert f"resumed from {run_dir}/ckpt/ckpt-" in err, err[-2000:]
  # Both workers hold the same variables: same genotype, same metrics.
  assert outputs[0][0] == outputs[1][0]
  assert "final: val/acc=" in outputs[0][0]
  assert len(history.read_text().splitlines()) == epochs_done + 1


def test_cli_bad_tf_config_is_one_clear_line(tmp_path):
  env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3",
             TF_CONFIG="{not json")
  proc = subprocess.run(
      [sys.executable, "-m", "tfnas.apps.search", "--strategy=multi_worker",
       "--dataset=digits", f"--run_dir={tmp_path}/r"], env=env, cwd=ROOT,
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "bad TF_CONFIG for a multi-worker run" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("tf_config, tasks", [
    (None, 0), ("", 0),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"index": 0}}', 1),
    ('{"cluster": {"chief": ["c:1"], "worker": ["a:1", "b:2"]}}', 3),
    ("{not json", -1), ('["a"]', -1),
])
def test_auto_strategy_counts_the_tf_config_cluster(tf_config, tasks):
  # --strategy=auto is multi_worker unless the count is 0 or 1 (a malformed
  # TF_CONFIG then fails with multi_worker's one-line error).
  assert startup.cluster_tasks(tf_config) == tasks


def test_a_worker_waiting_for_its_cluster_says_so_and_stops_on_ctrl_c(
    tmp_path):
  # Its peer never starts. It used to wait silently (its start-up output is
  # silenced) and ignore Ctrl-C, whose Python handler cannot run while
  # TensorFlow blocks: a mistyped port looked like a dead job. (SIGTERM is
  # caught by TensorFlow's own handler during that wait.)
  signum = signal.SIGINT
  workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
  env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3",
             TF_CONFIG=_tf_config(workers, 0))
  log = tmp_path / "stderr.txt"
  with open(log, "w") as err:
    # A process started in the background inherits SIGINT ignored (which
    # the app keeps, as it should): start from the interactive default.
    proc = subprocess.Popen(
        [sys.executable, "-m", "tfnas.apps.search", "--dataset=digits",
         f"--run_dir={tmp_path}/r"], env=env, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=err,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  try:
    deadline = time.monotonic() + 120
    while "waiting until every task has connected" not in log.read_text():
      assert proc.poll() is None, log.read_text()[-3000:]
      assert time.monotonic() < deadline, log.read_text()[-3000:]
      time.sleep(0.2)
    assert "(worker 0 of a 2-task TF_CONFIG cluster)" in log.read_text()
    time.sleep(1)  # Into TensorFlow's wait (logged just before it).
    assert proc.poll() is None
    proc.send_signal(signum)
    assert proc.wait(timeout=30) == -signum
  finally:
    if proc.poll() is None:
      proc.kill()
  assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_cli_cpu_replicas_search_runs_mirrored_replicas(tmp_path):
  # The README's mirrored run on CPUs, from the command line alone.
  env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run(
      [sys.executable, "-m", "tfnas.apps.search",
       "--flagfile=flags/darts_digits.cfg", "--cpu_replicas=2",
       "--space=s3", "--num_cells=3", "--num_nodes=2", "--channels=4",
       "--epochs=1", "--max_steps_per_epoch=2", "--steps_per_loop=2",
       "--noprogress", f"--run_dir={tmp_path}/r"], env=env, cwd=ROOT,
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "MirroredStrategy: 2 replicas" in proc.stderr
  assert "final: val/acc=" in proc.stdout
  proc = subprocess.run(
      [sys.executable, "-m", "tfnas.apps.search", "--cpu_replicas=-1"],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "cpu_replicas" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_multi_worker_without_a_cluster_says_it_runs_one_worker():
  env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("TF_CONFIG", None)
  proc = subprocess.run(
      [sys.executable, "-c", "from tfnas.apps import startup\n"
       "tf, strategy = startup.start_tensorflow('multi_worker')\n"
       "print(type(strategy).__name__, strategy.num_replicas_in_sync)"],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split()[-2:] == ["CollectiveAllReduceStrategy", "1"]
  assert ("--strategy=multi_worker without a TF_CONFIG cluster of several "
          "tasks (no TF_CONFIG): running as one worker") in proc.stderr


_SIGNALS = """
import os, signal, time
# A process started in the background inherits SIGINT ignored: start from
# Python's own Ctrl-C handler, as an interactive run does.
signal.signal(signal.SIGINT, signal.default_int_handler)
import tensorflow as tf
from tfnas.train import stopping
class TwoWorkers:
  cluster_resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
      tf.train.ClusterSpec({"worker": ["a:1", "b:2"]}), task_type="worker",
      task_id=0)
with stopping.sigterm_flag(TwoWorkers()) as interrupted:
  os.kill(os.getpid(), signal.SIGINT)
  os.kill(os.getpid(), signal.SIGTERM)
  time.sleep(0.2)
print("requests", interrupted == [signal.SIGINT, signal.SIGTERM])
assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
with stopping.sigterm_flag(tf.distribute.get_strategy()) as interrupted:
  try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
  except KeyboardInterrupt:
    print("ctrl-c raises", interrupted == [])
"""


def test_ctrl_c_is_a_stop_request_in_multi_worker_runs():
  # Multi-worker runs take Ctrl-C like SIGTERM, a request that
  # stop_agreement shares; other runs keep Ctrl-C's KeyboardInterrupt.
  proc = subprocess.run([sys.executable, "-c", _SIGNALS], cwd=ROOT,
                        capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split("\n")[:2] == ["requests True", "ctrl-c raises True"]


def test_cli_bad_tf_config_under_auto_is_one_clear_line(tmp_path):
  env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3",
             TF_CONFIG="{not json")
  proc = subprocess.run(
      [sys.executable, "-m", "tfnas.apps.search", "--dataset=digits",
       "--space=s3", "--num_cells=3", "--num_nodes=1", "--channels=4",
       "--epochs=1", "--max_steps_per_epoch=1", "--steps_per_loop=1",
       "--noprogress", f"--run_dir={tmp_path}/r"], env=env, cwd=ROOT,
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "bad TF_CONFIG for a multi-worker run" in proc.stderr
  assert not (tmp_path / "r").exists()
