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


def _note(stdout, start):
  """The one line of ``stdout`` that starts with ``start`` (the notes a
  measurement prints below the table)."""
  lines = [l for l in stdout.splitlines() if l.startswith(start)]
  assert len(lines) == 1, stdout
  return lines[0]


def _row(stdout, name):
  """The measurement's row of the main table (``--split`` prints a second
  table after it)."""
  main_table = stdout.split("\nParts of a step")[0]
  rows = [l for l in main_table.splitlines() if l.startswith(f"| {name} |")]
  assert len(rows) == 1, stdout
  return [c.strip() for c in rows[0].strip("|").split("|")]


@pytest.mark.parametrize("script,row,peak_column,extra", [
    ("bench_single_path.py", "dsnas_darts", 5, ()),
    ("bench_single_path.py", "dsnas_switch_shufflenet", 5,
     ("--intra_op_threads=1", "--inter_op_threads=3")),
    ("bench_search_step.py", "fwd_bwd", 4, ()),
])
def test_quick_run_prints_a_measured_row(script, row, peak_column, extra):
  proc = _run(script, "--quick", f"--only={row}", *extra)
  assert proc.returncode == 0, proc.stderr[-3000:]
  if extra:
    assert "threads intra/inter 1/3" in proc.stdout.splitlines()[0]
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
  line = _note(proc.stdout, "child_per_op_darts, s/step")
  times = dict(re.findall(r"(\w+) (\d+\.\d+)", line.split(": ", 1)[1]))
  assert set(times) == {"none", "max_pool_3x3", "avg_pool_3x3",
                        "skip_connect", "sep_conv_3x3", "sep_conv_5x5",
                        "dil_conv_3x3", "dil_conv_5x5"}
  # The row's s/step is the mean of the per-op times (rounded in print).
  mean = sum(float(t) for t in times.values()) / len(times)
  assert abs(float(cells[3]) - mean) < 2e-3
  # --split: the parts of the step (forward, backward, optimizer) of the
  # same children, timed as separately traced functions.
  _note(proc.stdout, "| measurement | forward |")
  parts = [l for l in proc.stdout.splitlines()
           if l.startswith("| child_per_op_darts |")][-1]
  forward, backward, opt, fwd_bwd, step = (
      float(c) for c in parts.strip("|").split("|")[1:])
  assert forward > 0 and fwd_bwd > 0
  assert abs(forward + backward - fwd_bwd) < 2e-3
  assert abs(fwd_bwd + opt - step) < 2e-3
  assert abs(step - float(cells[3])) < 2e-3


def test_switch_vs_child_compares_the_same_children_both_ways():
  proc = _run("bench_single_path.py", "--quick", "--children=3",
              "--only=switch_vs_child_darts")
  assert proc.returncode == 0, proc.stderr[-3000:]
  cells = _row(proc.stdout, "switch_vs_child_darts")
  assert cells[6] == "3 children"
  line = _note(proc.stdout, "switch_vs_child_darts, s/step")
  pairs = re.findall(r"(\d+\.\d+) / (\d+\.\d+) \((\d+\.\d+)\)", line)
  assert len(pairs) == 3, line
  for whole, switched, ratio in pairs:
    assert float(whole) > 0 and float(switched) > 0
  # The row's s/step is the switched step's mean over the children.
  mean = sum(float(b) for _, b, _ in pairs) / 3
  assert abs(float(cells[3]) - mean) < 2e-3
  ratios = [float(r) for _, _, r in pairs]
  assert abs(float(line.rsplit(" ", 1)[1]) - sum(ratios) / 3) < 0.011


def test_rounds_alternate_rows_and_report_each_ratio_and_the_median():
  # Smaller than --quick (one node per cell, one warm-up step): four
  # processes trace here, and only the report is tested.
  proc = _run("bench_single_path.py", "--batch_size=4", "--channels=4",
              "--cells=3", "--nodes=1", "--image_size=8", "--steps=2",
              "--warmup=1", "--rounds=2",
              "--only=snas_darts,dsnas_switch_darts")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rounds = proc.stdout.split("## Round ")[1:]
  assert [r.split("\n")[0] for r in rounds] == ["1 of 2", "2 of 2"]
  speed = []
  for r in rounds:
    table = r.split("## Over")[0]
    snas, switched = (_row(table, n) for n in ("snas_darts",
                                               "dsnas_switch_darts"))
    mean = float(re.search(r"dsnas_switch_darts: mean (\d+\.\d+)",
                           table).group(1))
    step = float(snas[3])
    assert step > 0 and mean > 0
    # Both are printed to 3 decimals: the ratio lies within these bounds.
    speed.append(((step - 5e-4) / (mean + 5e-4),
                  (step + 5e-4) / max(mean - 5e-4, 1e-9)))
  line = _note(proc.stdout, "dsnas_switch_darts vs snas_darts: faster by ")
  reported = [float(x) for x in re.findall(r"(\d+\.\d+)x", line)]
  # Two per-round speed-ups and their median, then the memory ratios
  # (printed values are rounded: compare loosely).
  assert len(reported) == 6, line
  for got, (low, high) in zip(reported[:2], speed):
    assert low - 0.005 <= got <= high + 0.005, (got, low, high)
  assert abs(reported[2] - (reported[0] + reported[1]) / 2) < 0.011


@pytest.mark.parametrize("script, arg, message", [
    ("bench_single_path.py", "--rounds=0",
     "--rounds must be at least 1, got 0"),
    ("bench_single_path.py", "--intra_op_threads=-1",
     "--intra_op_threads must be 0 or more, got -1"),
    ("bench_single_path.py", "--steps=0", "--steps must be at least 1, got 0"),
    ("bench_single_path.py", "--warmup=-2", "--warmup must be 0 or more"),
    ("bench_search_step.py", "--batch_size=0",
     "--batch_size must be at least 1, got 0"),
    ("bench_search_step.py", "--intra_op_threads=-1",
     "--intra_op_threads must be 0 or more, got -1"),
    ("bench_search_step.py", "--grappler_off=remapping,bogus",
     "--grappler_off: unknown optimizer(s) ['bogus']"),
])
def test_bad_arguments_are_one_clear_error(script, arg, message):
  proc = _run(script, arg)
  assert proc.returncode == 2
  assert message in proc.stderr, proc.stderr
  assert "Traceback" not in proc.stderr
