"""Run directories: config fingerprint, safe writes, resume checks.

A run directory holds ``config.json`` (the effective config), checkpoints in
``ckpt/``, TensorBoard events in ``tb/`` and the current ``genotype.json``.
Nothing already in a run directory is overwritten by a different run.
"""

from __future__ import annotations


import atexit
import glob
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterable

from absl import logging

from tfnas.errors import TfnasError


class RunDirError(TfnasError):
  """The run directory cannot be used as asked; the message says why."""


def _umask() -> int:
  """The process's umask, read from /proc, not by setting it (it is
  process-wide: other threads would briefly see another); 0o022 where /proc
  is absent."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  return 0o022


def new_file_mode() -> int:
  """The mode ``open()`` would give a new file (0o666 less the umask)."""
  return 0o666 & ~_umask()


def new_dir_mode() -> int:
  """The mode ``os.mkdir()`` would give a new folder (0o777 less the umask)."""
  return 0o777 & ~_umask()


def atomic_write(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` via a temp file and rename (no torn files).

  The file gets the permissions of a plainly created one (a temp file's
  are owner-only), so a run directory shared by several workers or users
  stays readable like its checkpoints.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
  try:
    os.chmod(tmp, new_file_mode())
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _history_records(run_dir: str) -> list[dict[str, Any]]:
  """The JSON objects of ``run_dir/history.jsonl``, in order (other lines
  skipped; [] when the file cannot be read)."""
  try:
    with open(os.path.join(run_dir, "history.jsonl"),
              errors="replace") as f:
      lines = f.readlines()
  except OSError:
    return []
  records = []
  for line in lines:
    try:
      record = json.loads(line)
    except (ValueError, RecursionError):
      continue
    if isinstance(record, dict):
      records.append(record)
  return records


def last_history(run_dir: str) -> dict[str, Any]:
  """The last epoch's metrics in ``run_dir/history.jsonl`` ({} when there
  are none or the file cannot be read)."""
  records = _history_records(run_dir)
  return records[-1] if records else {}


def epoch_history(run_dir: str, epoch: int) -> dict[str, Any]:
  """The metrics ``run_dir/history.jsonl`` logged for (1-based) ``epoch``,
  its latest line if several ({} when there is none or the file cannot be
  read)."""
  found = [r for r in _history_records(run_dir) if r.get("epoch") == epoch]
  return found[-1] if found else {}


def read_config(run_dir: str) -> dict[str, Any]:
  """The ``config.json`` a run directory holds, as saved.

  Raises:
    RunDirError: it cannot be read (missing included), is not JSON, or is
      not a JSON object.
  """
  path = os.path.join(run_dir, "config.json")
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError, RecursionError) as e:
    raise RunDirError(f"cannot read {path} ({e})") from None
  if not isinstance(saved, dict):
    raise RunDirError(f"{path} holds a JSON {type(saved).__name__}, not a "
                      "run config")
  return saved


def worker_scratch(run_dir: str, resume: bool, worker: str) -> str:
  """The directory a non-chief worker of a multi-worker run writes to.

  Every worker takes part in saving checkpoints (saving can read
  synchronised variables, a collective), but only the chief's files are
  the run: the others write into a private temporary directory, removed
  when the process exits. Nothing is written into ``run_dir``. A resuming
  worker restores the chief's checkpoint from ``run_dir``, so the workers
  must share it (a shared filesystem, or a copy of the run on each
  machine).
  """
  if resume and not os.path.exists(os.path.join(run_dir, "config.json")):
    raise RunDirError(f"{worker}: --resume restores the chief's checkpoint "
                      f"from {run_dir}, which this worker cannot see; give "
                      "every worker the same --run_dir on a shared "
                      "filesystem")
  path = tempfile.mkdtemp(prefix=f"tfnas-{worker}-")
  atexit.register(shutil.rmtree, path, True)
  return path


_MAX_LISTED = 8  # Differing config keys named in one error line.


def run_kind(config: dict[str, Any]) -> str | None:
  """Which command wrote a run's config: ``"tfnas-search"`` (it names a
  ``method``), ``"tfnas-train"`` (a ``genotype``) or None (neither)."""
  if "method" in config:
    return "tfnas-search"
  if "genotype" in config:
    return "tfnas-train"
  return None


def holds_checkpoints(folder: str) -> bool:
  """Whether ``folder`` is a checkpoint folder: its checkpoint list, or
  checkpoint files when the list was lost."""
  return os.path.exists(os.path.join(folder, "checkpoint")) or bool(
      glob.glob(os.path.join(glob.escape(folder), "*-*.index")))


def resume_hint(run_dir: str) -> str | None:
  """What a rerun with --resume does for a stopped run in ``run_dir``:
  continue from its last checkpoint, or start it over; None when nothing
  was saved there."""
  if holds_checkpoints(os.path.join(run_dir, "ckpt")):
    return (f"{run_dir} holds the last checkpoint: rerun with --resume to "
            "continue")
  if os.path.exists(os.path.join(run_dir, "config.json")):
    return f"rerun with --resume to start {run_dir} over"
  return None


def has_run(run_dir: str) -> bool:
  """Whether ``run_dir`` holds a run (its config.json or checkpoints)."""
  return os.path.exists(os.path.join(run_dir, "config.json")) or os.path.isdir(
      os.path.join(run_dir, "ckpt"))


def prepare(run_dir: str, config: dict[str, Any], resume: bool,
            allowed_changes: Iterable[str] = (),
            defaults: dict[str, Any] | None = None,
            normalize: Callable[[dict], dict] | None = None,
            check_saved: Callable[[dict, dict], None] | None = None,
            respelled: Iterable[str] = ()) -> bool:
  """Checks ``run_dir`` against ``config``; returns True when resuming.

  * fresh or empty directory: writes ``config.json``;
  * directory of an earlier run without ``resume``: refuses;
  * ``resume`` with a different config (other than ``allowed_changes``):
    refuses, naming the differing keys;
  * ``resume`` on a directory without a run: refuses.

  Values compare as JSON (tuples equal lists); a key missing from the saved
  config (a run written before the key existed) compares as its entry in
  ``defaults``; ``normalize`` maps both configs to the form they compare in
  (e.g. a value spelt out and the preset it equals); a ``respelled`` key
  whose value compares equal in that form but is spelt otherwise (a data
  file moved elsewhere) is saved as ``config`` gives it, other keys as
  saved; ``check_saved`` may refuse the saved config first, with its own
  message (as in `resumable_config`).
  """
  if os.path.exists(run_dir) and not os.path.isdir(run_dir):
    raise RunDirError(f"--run_dir {run_dir} is a file, not a directory; "
                      "choose another --run_dir")
  config = json.loads(json.dumps(config))
  if not has_run(run_dir):
    if resume:
      raise RunDirError(f"--resume given but {run_dir} holds no run to "
                        "resume; drop --resume to start a new run")
    if os.path.isdir(run_dir) and os.listdir(run_dir):
      raise RunDirError(f"run directory {run_dir} is not empty and holds no "
                        "tfnas run; choose another --run_dir")
    _write_config(run_dir, config)
    return False
  if not resume:
    raise RunDirError(f"run directory {run_dir} already holds a run; pass "
                      "--resume to continue it or choose another --run_dir")
  saved = resumable_config(run_dir, config, allowed_changes, defaults,
                           normalize, check_saved)
  allowed = set(allowed_changes) | _ALWAYS_ALLOWED
  merged = dict(saved)
  merged.update({k: config[k] for k in allowed if k in config})
  for key in respelled:
    # Equal once normalised: resumable_config has compared them.
    if key in saved and key in config and saved[key] != config[key]:
      logging.info("resuming with %s=%s (the run's was %s); saved to "
                   "config.json", key, config[key], saved[key])
      merged[key] = config[key]
  finished = last_history(run_dir).get("epoch")
  if (isinstance(finished, int) and isinstance(merged.get("epochs"), int)
      and merged["epochs"] < finished):
    # Fewer epochs than the run has finished: none run, and config.json
    # keeps the number it had (it sets the schedules' length).
    merged["epochs"] = saved.get("epochs", merged["epochs"])
  planned = saved.get("epochs")
  if isinstance(planned, int) and merged.get("epochs") != planned:
    logging.warning(
        "--epochs=%s changes the run's planned %s: schedules computed over "
        "the whole run (learning rate, SNAS's temperature, tfnas-train's "
        "drop-path) jump to where a %s-epoch run is at this step",
        merged["epochs"], planned, merged["epochs"])
  _write_config(run_dir, merged)
  return True


_ALWAYS_ALLOWED = {"resume", "run_dir"}


def resumable_config(run_dir: str, config: dict[str, Any],
                     allowed_changes: Iterable[str] = (),
                     defaults: dict[str, Any] | None = None,
                     normalize: Callable[[dict], dict] | None = None,
                     check_saved: Callable[[dict, dict], None] | None = None
                     ) -> dict[str, Any]:
  """The config saved in ``run_dir`` (missing keys from ``defaults``), after
  checking that ``config`` may resume it; writes nothing. Apps call it
  before loading data or building anything, so that a resume with other
  flags is told so, not refused for what those flags would load.
  ``normalize``: as in `prepare`. ``check_saved(saved, config)`` runs
  before the comparison and may raise a clearer error than a difference
  (e.g. a data file that changed since the run read it).

  Raises:
    RunDirError: ``config.json`` cannot be read, is of another kind of run,
      or differs from ``config`` outside ``allowed_changes``.
  """
  config = json.loads(json.dumps(config))
  defaults = json.loads(json.dumps(defaults or {}))
  try:
    saved = read_config(run_dir)
  except RunDirError as e:
    # Its checkpoints may be intact: the run's flags are what is lost.
    raise RunDirError(f"{e}; without it this run cannot be resumed: put "
                      "it back (a new run with the run's flags writes the "
                      "same file in an empty --run_dir) or choose another "
                      "--run_dir") from None
  kinds = run_kind(saved), run_kind(config)
  if None not in kinds and kinds[0] != kinds[1]:
    raise RunDirError(f"run directory {run_dir} holds a {kinds[0]} run, not "
                      f"a {kinds[1]} run; choose another --run_dir")
  if check_saved is not None:
    check_saved(saved, config)
  saved = {**{k: v for k, v in defaults.items() if k in config}, **saved}
  # The directory is the run: a path spelt differently (a trailing slash,
  # relative) or a run moved or copied elsewhere resumes.
  allowed = set(allowed_changes) | _ALWAYS_ALLOWED
  before, after = ((normalize(saved), normalize(config)) if normalize else
                   (saved, config))
  differing = sorted(k for k in set(before) | set(after)
                     if k not in allowed and before.get(k) != after.get(k))
  if differing:
    details = ", ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}"
                        for k in differing[:_MAX_LISTED])
    if len(differing) > _MAX_LISTED:
      details += f" and {len(differing) - _MAX_LISTED} more"
    raise RunDirError(f"run directory {run_dir} holds a run with a different "
                      f"config ({details}); resume with the same flags or "
                      "choose another --run_dir")
  return saved


def _write_config(run_dir: str, config: dict[str, Any]) -> None:
  try:
    atomic_write(os.path.join(run_dir, "config.json"),
                 json.dumps(config, indent=2, sort_keys=True))
  except OSError as e:  # Not a directory, read-only, no space left...
    raise RunDirError(f"cannot write the run to --run_dir {run_dir}: "
                      f"{e.strerror or e}; choose another --run_dir") from None
