"""What a run keeps of its npz data file and how a resume compares it.

A run on ``npz:PATH`` saves the file by its absolute path and content
fingerprint in config.json (`tfnas.dataset_names.saved_name`) and writes
`RECORD` (``dataset.json``: the file's `DatasetInfo`) into its run
directory, so its export reads the shape, normalisation and classes without
the file (`run_dataset_info`). A resume must read the same bytes, at the
run's path or another (`check_saved_dataset`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

from absl import logging

from tfnas import dataset_names
from tfnas.data.npz_source import check_file, file_version
from tfnas.data.registry import DataError, DatasetInfo, dataset_info

#: A run directory's record of its npz data: shape, normalisation, classes
#: (`record`). Exports read it, so a run directory copied without its data
#: file still exports.
RECORD = "dataset.json"

is_npz_name = dataset_names.is_npz_name


def check_saved_dataset(saved: dict, config: dict | None = None) -> None:
  """Refuses to resume a run (``saved``: its config.json) on other data than
  its own, naming both, where an npz file is involved: the run's file
  changed at its path (`check_file`), or the resume (``config``: its config
  dict) names another file, or a registered dataset, or the run was on a
  registered dataset and the resume names a file. The same content at
  another path (the data moved) resumes."""
  name = saved.get("dataset")
  given = (config or {}).get("dataset", name)
  if not (is_npz_name(name) or is_npz_name(given)) or name == given:
    return
  fingerprint = dataset_names.fingerprint_of(name)
  if is_npz_name(given) and fingerprint is not None:
    if dataset_names.file_path(given) == dataset_names.file_path(name):
      check_file(name)
      return
    if dataset_names.fingerprint_of(given) == fingerprint:
      return  # Moved.
  if fingerprint is not None:
    state = dataset_names.file_state(name)
    where = ("" if state == "same" else
             f", which {dataset_names.FILE_STATES[state]}")
    raise DataError(f"this run was on --dataset={_shown(name)}{where}; "
                    f"resume it with --dataset=npz:PATH naming a file of "
                    f"those bytes, at that path or another, not "
                    f"--dataset={_shown(given)}")
  raise DataError(f"this run was on --dataset={_shown(name)}; resume it on "
                  f"that data, not --dataset={_shown(given)}")


def _shown(name) -> str:
  """A dataset name as flags give it (an npz file by its path), with an
  npz file's fingerprint after it."""
  fingerprint = dataset_names.fingerprint_of(name)
  return str(dataset_names.flag_name(name)) + (
      f" (content sha256 {fingerprint}...)" if fingerprint else "")


def record(info: DatasetInfo) -> str | None:
  """The text of a run directory's `RECORD` for an npz dataset's ``info``
  (None for other datasets: their facts live in the registry)."""
  if not is_npz_name(info.name):
    return None
  return json.dumps(dataclasses.asdict(info), indent=2, sort_keys=True)


def run_dataset_info(run_dir: str, name: str) -> DatasetInfo:
  """The `DatasetInfo` of the run in ``run_dir``, whose config.json names
  ``name``: for an npz file, the run's `RECORD` when it holds that content
  (the file itself is then not read, and need not be there), else the
  dataset read by name (`registry.dataset_info`)."""
  if is_npz_name(name):
    recorded = recorded_info(run_dir, name)
    if recorded is not None:
      return recorded
  return dataset_info(name)


def recorded_info(run_dir: str, name: str) -> DatasetInfo | None:
  """The `DatasetInfo` in ``run_dir``'s `RECORD` when it describes the npz
  content ``name`` names (None when there is none, or it cannot be read,
  or it describes other data: a warning says which)."""
  path = os.path.join(run_dir, RECORD)
  if dataset_names.fingerprint_of(name) is None or not os.path.isfile(path):
    return None
  try:
    version = file_version(path)
  except DataError:  # Gone since.
    return None
  return _recorded_info(path, name, *version)


@functools.lru_cache(maxsize=4)
def _recorded_info(path: str, name: str, *unused_version
                   ) -> DatasetInfo | None:
  """`recorded_info` per version of the record (a warning said once)."""
  fingerprint = dataset_names.fingerprint_of(name)
  try:
    with open(path, encoding="utf-8") as f:
      info = DatasetInfo(**json.load(f))
  except (OSError, ValueError, TypeError, DataError) as e:
    logging.warning("%s cannot be read (%s); reading the data file instead",
                    path, e)
    return None
  if dataset_names.fingerprint_of(info.name) != fingerprint:
    logging.warning("%s describes other data than config.json's %s; "
                    "reading the data file instead", path, name)
    return None
  return dataclasses.replace(info, name=name)
