"""Stop signals while the main thread waits inside TensorFlow, where Python
runs no signal handler: said at once, and a second Ctrl-C still stops."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_BLOCKED = """
import os, signal, sys, threading, time
# As in an interactive run (a background job may start with SIGINT ignored).
signal.signal(signal.SIGINT, signal.default_int_handler)
import tensorflow as tf
from tfnas.train import stopping
queue = tf.queue.FIFOQueue(1, tf.int32)
signum = getattr(signal, sys.argv[1])

def said():  # Whether the watcher has said the first signal arrived.
  for _ in range(400):
    if signum in getattr(stopping._watcher, "_announced", ()):
      return True
    time.sleep(0.05)
  return False

def send():
  time.sleep(0.5)
  os.kill(os.getpid(), signum)
  print("said", said(), flush=True)
  if signum == signal.SIGINT:
    os.kill(os.getpid(), signum)  # Ctrl-C again: ends the process at once.
    time.sleep(10)
  queue.enqueue(1)  # Lets the main thread go on (too late for a Ctrl-C).

with stopping.sigterm_flag(run_dir=sys.argv[2]) as interrupted, \\
     stopping.ctrl_c_stops(interrupted):
  threading.Thread(target=send, daemon=True).start()
  queue.dequeue()  # Inside TensorFlow: no Python handler runs meanwhile.
  print("returned", interrupted, flush=True)
"""


@pytest.mark.parametrize("signame, status", [("SIGINT", 130),
                                              ("SIGTERM", 0)])
def test_a_stop_signal_is_said_at_once_while_tensorflow_is_busy(
    signame, status, tmp_path):
  run_dir = tmp_path / "run"
  (run_dir / "ckpt").mkdir(parents=True)
  (run_dir / "ckpt" / "checkpoint").write_text("")
  # The main thread waits inside TensorFlow (as in a first call's graph
  # optimisation), where Python runs no signal handler.
  proc = subprocess.run([sys.executable, "-c", _BLOCKED, signame,
                         str(run_dir)], cwd=ROOT,
                        capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert proc.returncode == status, proc.stderr[-2000:]
  assert "said True" in proc.stdout
  name = "Ctrl-C" if signame == "SIGINT" else "SIGTERM"
  assert proc.stderr.count(f"{name} arrived while TensorFlow runs a "
                           "compiled call") == 1
  if signame == "SIGINT":  # Ended at once by the second Ctrl-C.
    assert "returned" not in proc.stdout
    assert "Ctrl-C again while TensorFlow is busy: stopping at once" in (
        proc.stderr)
    # The app's line on how to go on cannot follow: this one says it.
    assert (f"last checkpoint; {run_dir} holds the last checkpoint: rerun "
            "with --resume to continue") in proc.stderr
  else:  # The request is taken when the call returns, and said only once.
    assert "returned [15]" in proc.stdout
    assert "SIGTERM: stopping with a checkpoint" not in proc.stderr
