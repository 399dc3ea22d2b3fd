"""Smoke tests of the benchmark scripts on tiny networks (--quick)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
  return subprocess.run([sys.executable, os.path.join(ROOT, "tools", script),
                         *args], capture_output=True, text=True, cwd=ROOT,
                        timeout=600)


def _row(stdout, name):
  """The measurement's row of the main table (``--split`` prints a second
  table after it)."""
  main_table = stdout.split("\nParts of a step")[0]
  rows = [l for l in main_table.splitlines() if l.startswith(f"| {name} |")]
  assert len(rows) == 1, stdout
  return [c.strip() for c in rows[0].strip("|").split("|")]


@pytest.mark.parametrize("script,row,peak_column", [
    ("bench_single_path.py", "dsnas_darts", 5),
    ("bench_single_path.py", "dsnas_switch_shufflenet", 5),
    ("bench_search_step.py", "fwd_bwd", 4),
])
def test_quick_run_prints_a_measured_row(script, row, peak_column):
  proc = _run(script, "--quick", f"--only={row}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  cells = _row(proc.stdout, row)
  step_s, peak = float(cells[3]), float(cells[peak_column])
  assert step_s > 0
  assert 0.1 < peak < 64  # GiB: a real resident-memory reading.


def test_unknown_measurement_is_one_clear_error():
  proc = _run("bench_single_path.py", "--only=nope")
  assert proc.returncode == 2
  assert re.search(r"--only: unknown measurement\(s\) \['nope'\]",
                   proc.stderr), proc.stderr


def test_per_op_children_bound_has_one_time_per_candidate():
  proc = _run("bench_single_path.py", "--quick", "--split",
              "--only=child_per_op_darts")
  assert proc.returncode == 0, proc.stderr[-3000:]
  cells = _row(proc.stdout, "child_per_op_darts")
  assert cells[6] == "8 children"
  line = [l for l in proc.stdout.splitlines()
          if l.startswith("child_per_op_darts, s/step")]
  assert len(line) == 1, proc.stdout
  times = dict(re.findall(r"(\w+) (\d+\.\d+)", line[0].split(": ", 1)[1]))
  assert set(times) == {"none", "max_pool_3x3", "avg_pool_3x3",
                        "skip_connect", "sep_conv_3x3", "sep_conv_5x5",
                        "dil_conv_3x3", "dil_conv_5x5"}
  # The row's s/step is the mean of the per-op times (rounded in print).
  mean = sum(float(t) for t in times.values()) / len(times)
  assert abs(float(cells[3]) - mean) < 2e-3
  # --split: the parts of the step (forward, backward, optimizer) of the
  # same children, timed as separately traced functions.
  header = [l for l in proc.stdout.splitlines()
            if l.startswith("| measurement | forward |")]
  assert len(header) == 1, proc.stdout
  parts = [l for l in proc.stdout.splitlines()
           if l.startswith("| child_per_op_darts |")][-1]
  forward, backward, opt, fwd_bwd, step = (
      float(c) for c in parts.strip("|").split("|")[1:])
  assert forward > 0 and fwd_bwd > 0
  assert abs(forward + backward - fwd_bwd) < 2e-3
  assert abs(fwd_bwd + opt - step) < 2e-3
  assert abs(step - float(cells[3])) < 2e-3
