"""What the benchmark scripts share: memory probes and one process per row.

Each measurement runs in a fresh subprocess (the script re-runs itself with
``--child --only=<row>``) so that its peak resident memory is its own, not the
maximum over everything measured before it. The child prints one
``RESULT <json>`` line; the parent collects them and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Callable, Sequence


def _status_gib(field: str) -> float | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) / 2**20
  except OSError:
    pass
  return None


def peak_rss_gib() -> float:
  """Peak resident set size of this process (VmHWM) in GiB."""
  value = _status_gib("VmHWM")
  if value is None:
    import resource  # Fallback where /proc is missing; kB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  return value


def rss_gib() -> float:
  """Current resident set size (VmRSS) in GiB; NaN where unknown."""
  value = _status_gib("VmRSS")
  return float("nan") if value is None else value


def reset_peak_rss() -> bool:
  """Resets this process's VmHWM to its current RSS (Linux); False if not.

  Free heap pages are first returned to the OS (glibc ``malloc_trim``) so
  that memory freed earlier (graph optimisation) does not count as in use.
  """
  try:
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def select_measurements(parser: argparse.ArgumentParser, only: str,
                        measurements: Sequence[str]) -> list[str]:
  """``--only``'s comma-separated names, checked against ``measurements``."""
  chosen = [m for m in only.split(",") if m]
  bad = [m for m in chosen if m not in measurements]
  if bad:
    parser.error(f"--only: unknown measurement(s) {bad}; choose from "
                 f"{tuple(measurements)}")
  return chosen


def check_counts(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 positive: Sequence[str] = (),
                 non_negative: Sequence[str] = ()) -> None:
  """Refuses (``parser.error``, status 2) sizes and counts out of range."""
  for name in positive:
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
  for name in non_negative:
    if getattr(args, name) < 0:
      parser.error(f"--{name} must be 0 or more, got {getattr(args, name)}")


def child_main(measure: Callable[[str], dict], which: str) -> None:
  """In the child process: measure one row and print its RESULT line."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  print("RESULT " + json.dumps(measure(which)), flush=True)


def run_rows(script: str, argv: Sequence[str] | None, rows: Sequence[str],
             columns: Sequence[tuple[str, str, str]]) -> tuple[
                 dict[str, dict], bool]:
  """Runs ``script --child --only=<row>`` per row and prints a markdown table.

  Args:
    script: the benchmark script's path (it must handle ``--child``).
    argv: the parent's arguments (``sys.argv[1:]`` when None); ``--only``
      is replaced per row.
    rows: measurement names, in order.
    columns: ``(title, RESULT key, format spec)`` per table column.

  Returns:
    ``(results by row, whether any row failed)``. A failed row prints the
    tail of its stderr.
  """
  print("| " + " | ".join(title for title, _, _ in columns) + " |")
  print("|" + "---|" * len(columns))
  argv = list(sys.argv[1:] if argv is None else argv)
  results, failed = {}, False
  for which in rows:
    cmd = [sys.executable, os.path.abspath(script), "--child",
           f"--only={which}"] + [a for a in argv if not a.startswith("--only")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
      failed = True
      print(f"| {which} | failed (rc {proc.returncode}) |" +
            " |" * (len(columns) - 2))
      sys.stderr.write(proc.stderr[-4000:])
      continue
    results[which] = json.loads(lines[-1][len("RESULT "):])
    print("| " + " | ".join(format(results[which][key], spec)
                            for _, key, spec in columns) + " |", flush=True)
  return results, failed
