"""MultiWorkerMirroredStrategy: 2 worker processes on 127.0.0.1 take the same
DARTS step as the default strategy on the same global batch."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

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


@pytest.mark.slow
def test_two_workers_equal_default_strategy(tmp_path):
  ctx = helpers.tiny_context(space=helpers.replica_space(), global_batch=4)
  init = [v.numpy() for v in ctx.weight_variables + ctx.arch_variables]
  init_path = tmp_path / "init.npz"
  np.savez(init_path, values=np.array(init, dtype=object))
  DartsFirstOrder().step(ctx, helpers.batch(seed=1), helpers.batch(seed=2),
                         tf.constant(0, tf.int64))
  expected = [v.numpy() for v in ctx.weight_variables + ctx.arch_variables]

  workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
  procs = []
  for index in range(2):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", INIT_PATH=str(init_path),
               TF_CONFIG=json.dumps({"cluster": {"worker": workers},
                                     "task": {"type": "worker",
                                              "index": index}}))
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests", "multi_worker_step.py"),
         str(tmp_path / f"out{index}.npz")], env=env, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  for proc in procs:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
  moved = max(np.abs(a - b).max() for a, b in zip(expected, init))
  assert moved > 1e-4
  for index in range(2):
    got = np.load(tmp_path / f"out{index}.npz")
    values = [got[f"arr_{i}"] for i in range(len(expected))]
    for a, b in zip(expected, values):
      np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
