"""What a search checkpoint holds of a Keras network: all of its variables
but derived ones (a noise op's seed, set from the layer's path).

With Keras 3.15 on the TF backend, ``tf.train.Checkpoint(network=model)``
reaches only the layers held in plain attributes of the model: layers kept
in lists or dicts (the DARTS cells, the ShuffleNet blocks, a ChoiceBlock's
candidates, a MixedOp's ops) are Keras ``TrackedList``/``TrackedDict``
objects, which Keras converts for SavedModel export but not for
checkpoints. Their trainable weights still reached search checkpoints
through the optimizer's variable list, but their non-trainable variables
did not: BN moving statistics (what evaluation and an inherited-weight
child use) and dropout RNG states restarted from scratch on resume.
`ModelVariables` lists every variable of the model explicitly, keyed by its
position in ``model.variables`` without the derived ones (deterministic for
a given architecture; variable *paths* are not: Keras numbers
random-generator states by a process-wide counter).

`restore_problem` restores objects from a checkpoint prefix given by a user,
or says in one line why it does not fit (without TensorFlow's flood of
"unrestored value" warnings); `restore_latest` resumes a run from its newest
readable checkpoint.
"""

from __future__ import annotations

import os
import re

from absl import logging
import keras
import tensorflow as tf
# No public way to keep a deprecated call quiet.
from tensorflow.python.util import deprecation

from tfnas import ops
from tfnas.errors import TfnasError


class ModelVariables(tf.Module):
  """Every variable of ``model`` (weights, BN statistics, RNG states) but
  those set from its structure alone (`tfnas.ops.is_derived`: a noise op's
  seed), which a rebuilt network has already and older checkpoints lack."""

  def __init__(self, model, name: str = "model_variables"):
    super().__init__(name=name)
    kept = [v for v in model.variables if not ops.is_derived(v)]
    self.values = {f"v{i:05d}": getattr(v, "value", v)
                   for i, v in enumerate(kept)}


def checkpoint_list(directory: str):
  """``(state, prefixes)`` of the checkpoints in ``directory``, oldest first.

  Those its checkpoint list (the ``checkpoint`` file) names, with that
  list's state; when the list is missing or cannot be read but checkpoint
  files are there (a damaged, emptied or lost list), those files in number
  order, with a warning, and ``state`` None.
  """
  try:
    state = tf.train.get_checkpoint_state(directory)
  except ValueError:  # An empty list, or one naming no latest checkpoint.
    state = None
  if state is not None:
    return state, (list(state.all_model_checkpoint_paths) or
                   [state.model_checkpoint_path])
  numbered = []
  for index in tf.io.gfile.glob(os.path.join(directory, "*-*.index")):
    match = re.search(r"-(\d+)\.index$", index)
    if match:
      numbered.append((int(match.group(1)), index[:-len(".index")]))
  numbered.sort()
  if numbered:
    logging.warning(
        "the checkpoint list %s is missing or cannot be read; using the "
        "checkpoint files there: %s", os.path.join(directory, "checkpoint"),
        ", ".join(os.path.basename(p) for _, p in numbered))
  return None, [p for _, p in numbered]


def existing_checkpoints(directory: str) -> list[str]:
  """The checkpoints `checkpoint_list` finds in ``directory`` whose files
  are there (an ``.index`` file), oldest first."""
  if not tf.io.gfile.isdir(directory):
    return []
  return [p for p in checkpoint_list(directory)[1]
          if tf.io.gfile.exists(p + ".index")]


def checkpoint_prefix(path: str) -> str:
  """The checkpoint ``path`` names: a prefix, or one of its files (tab
  completion) meaning its prefix.

  Raises:
    TfnasError: there is no such checkpoint (no ``.index`` file).
  """
  prefix = re.sub(r"\.(index|data-\d+-of-\d+)$", "", path)
  if not tf.io.gfile.exists(prefix + ".index"):
    folder = os.path.dirname(prefix) or "."
    kept = existing_checkpoints(folder)
    hint = (f"; {folder} holds {', '.join(os.path.basename(p) for p in kept)}"
            if kept else "")
    raise TfnasError(f"checkpoint {prefix} not found (no "
                     f"{os.path.basename(prefix)}.index){hint}")
  return prefix


def resolve_checkpoint(run_dir: str, checkpoint: str | None,
                       remedy: str) -> str:
  """``checkpoint``, or the latest one under ``run_dir/ckpt`` when None.

  Raises:
    TfnasError: no checkpoint there yet (the message ends with ``remedy``),
      ``checkpoint`` has no ``.index`` file, or its values cannot be read
      (the message names the older checkpoints of ``run_dir``).
  """
  if checkpoint is None:
    _, listed = checkpoint_list(os.path.join(run_dir, "ckpt"))
    if not listed:
      raise TfnasError(f"{run_dir}/ckpt holds no checkpoint yet; {remedy}")
    checkpoint = listed[-1]
  checkpoint = checkpoint_prefix(checkpoint)
  problem = unreadable(checkpoint)
  if problem is not None:
    kept = existing_checkpoints(os.path.join(run_dir, "ckpt"))
    older = kept[:kept.index(checkpoint)] if checkpoint in kept else []
    hint = (f"; pass an older one with --checkpoint: {', '.join(older)}"
            if older else "")
    raise TfnasError(f"checkpoint {checkpoint} cannot be read "
                     f"({problem}){hint}")
  return checkpoint


def _node_paths(view) -> dict[int, str]:
  """Checkpoint node id → its object path (``network/values/v00000``)."""
  paths, todo = {0: ""}, [0]
  while todo:
    node = todo.pop()
    for name, child in view.children(node).items():
      if child not in paths:
        paths[child] = f"{paths[node]}/{name}" if paths[node] else name
        todo.append(child)
  return paths


def _is_variable(obj) -> bool:
  # Keras 3 variables wrap a tf.Variable but are not one.
  return isinstance(obj, (tf.Variable, keras.Variable))


def _mismatch(path: str, root) -> str | None:
  """Why ``root``'s variables cannot be restored from ``path``, found
  without restoring: a variable the checkpoint lacks or holds with another
  shape."""
  view = tf.train.CheckpointView(path)
  matched, _, unmatched = view.diff(root)
  missing = [v for v in unmatched if _is_variable(v)]
  if missing:
    return (f"it holds no value for {len(missing)} variables, e.g. "
            f"{missing[0].name} {tuple(missing[0].shape)}")
  saved = dict(tf.train.list_variables(path))
  paths = _node_paths(view)
  for node, obj in matched.items():
    if not _is_variable(obj):
      continue
    shape = saved.get(f"{paths[node]}/.ATTRIBUTES/VARIABLE_VALUE")
    if shape is not None and tuple(shape) != tuple(obj.shape):
      return (f"{paths[node]} has shape {tuple(shape)} there, "
              f"{tuple(obj.shape)} here ({obj.name})")
  return None


def restore_problem(path: str, **objects) -> str | None:
  """Restores ``objects`` (as ``tf.train.Checkpoint(**objects)``) from
  ``path``, if it fits; entries of the checkpoint they do not use are
  ignored.

  The fit is checked first (every variable present with its shape): a
  failed restore leaves pending restorations on the objects that log one
  warning per unmatched checkpoint value (hundreds) when they are deleted.

  Returns:
    None when every variable of ``objects`` was restored; otherwise one
    line saying why not (nothing was restored then).
  """
  root = tf.train.Checkpoint(**objects)
  try:
    problem = _mismatch(path, root)
    if problem is None:
      root.restore(path).expect_partial().assert_existing_objects_matched()
  except (AssertionError, ValueError, IndexError, tf.errors.OpError) as e:
    # IndexError: a data file cut short.
    problem = str(e).strip().splitlines()[0][:300]
  return problem


def checkpoint_progress(path: str) -> tuple[int, int] | None:
  """``(epoch, step_in_epoch)`` saved in the checkpoint ``path`` of a tfnas
  run: the epochs finished when it was written and the steps of the next
  one already taken (0 at an epoch's end); None when it does not hold
  them."""
  try:
    reader = tf.train.load_checkpoint(path)
    return tuple(int(reader.get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE"))
                 for name in ("epoch", "step_in_epoch"))
  except (tf.errors.OpError, ValueError, TypeError):
    return None


def progress_metadata(path: str) -> dict[str, int | None]:
  """Export metadata of checkpoint ``path``: ``epoch`` (the epochs finished
  when it was written; None when it does not say) and, for a checkpoint
  written mid-epoch (a stop, ``--checkpoint_every_steps``),
  ``step_in_epoch``."""
  progress = checkpoint_progress(path)
  if progress is None:
    return {"epoch": None}
  epoch, step_in_epoch = progress
  if step_in_epoch:
    return {"epoch": epoch, "step_in_epoch": step_in_epoch}
  return {"epoch": epoch}


def unreadable(path: str) -> str | None:
  """Why the values of checkpoint ``path`` cannot all be read (a missing or
  truncated data file), in one line; None when every value reads."""
  try:
    reader = tf.train.load_checkpoint(path)
    for name in reader.get_variable_to_shape_map():
      reader.get_tensor(name)
  except (tf.errors.OpError, IndexError, ValueError) as e:
    return str(e).strip().splitlines()[0][:300]
  return None


def _forget(directory: str, state, paths: list, latest: str,
            bad: set) -> None:
  """Rewrites ``directory``'s checkpoint list as ``paths`` without ``bad``,
  keeping the save times a `tf.train.CheckpointManager` uses to decide what
  to delete (``state``: the list as read; None when it could not be, and is
  then written anew from the files found, their times their files')."""
  keep = [i for i, p in enumerate(paths) if p not in bad]
  times = (list(state.all_model_checkpoint_timestamps) if state is not None
           else [tf.io.gfile.stat(p + ".index").mtime_nsec / 1e9
                 for p in paths])
  # The one public writer of the list; its deprecation notice would be
  # printed to the user, who can do nothing about it.
  with deprecation.silence():
    tf.compat.v1.train.update_checkpoint_state(
        directory, latest, [paths[i] for i in keep],
        all_model_checkpoint_timestamps=(
            [times[i] for i in keep] if len(times) == len(paths) else None),
        last_preserved_timestamp=(
            None if state is None else state.last_preserved_timestamp))


def restore_latest(checkpoint: tf.train.Checkpoint, directory: str,
                   forget_unreadable: bool = True,
                   described_by: str = "config.json") -> str | None:
  """Restores the newest checkpoint in ``directory`` that can be read into
  ``checkpoint``, for a resumed run; returns its path (None: no checkpoint
  there yet).

  A checkpoint whose files are missing or cut short (a crash while saving,
  a full disk) is skipped, with a warning, for the newest older one that
  reads, so a resume loses at most the steps since then; with
  ``forget_unreadable`` the skipped ones also leave the directory's
  checkpoint list (their files stay), so that a `tf.train.CheckpointManager`
  made afterwards neither keeps them nor deletes a readable one for them; a
  list that cannot be read is written anew from the files (`checkpoint_list`).
  One that reads but does not fit the network (another architecture or
  width) stops the resume: the older ones would not fit either; the error
  names ``described_by``, the run's files the network is built from.

  Raises:
    TfnasError: the newest readable checkpoint does not fit, or none reads.
  """
  state, paths = checkpoint_list(directory)
  skipped = []
  for path in reversed(paths):  # Newest first.
    problem = (None if tf.io.gfile.exists(path + ".index") else
               f"{os.path.basename(path)}.index is missing")
    if problem is None:
      try:
        misfit = _mismatch(path, checkpoint)
      except (tf.errors.OpError, IndexError, ValueError) as e:
        misfit, problem = None, str(e).strip().splitlines()[0][:300]
      if misfit is not None:
        raise TfnasError(
            f"cannot resume from {path}: {misfit}; this run's network does "
            f"not match its checkpoint (was {described_by} edited?): start a "
            f"new --run_dir")
      problem = problem or unreadable(path)
    if problem is not None:
      skipped.append((path, problem))
      continue
    checkpoint.restore(path).assert_existing_objects_matched()
    for bad, why in skipped:
      logging.warning("checkpoint %s cannot be read (%s); resuming from the "
                      "older %s", bad, why, path)
    if (skipped or state is None) and forget_unreadable:
      _forget(directory, state, paths, path, {p for p, _ in skipped})
    return path
  list_file = os.path.join(directory, "checkpoint")
  if (state is None and not paths and forget_unreadable and
      tf.io.gfile.exists(list_file)):
    # A list naming no checkpoint file, which the run's manager could not
    # read either.
    tf.io.gfile.remove(list_file)
  if skipped:
    bad, why = skipped[0]
    raise TfnasError(f"cannot resume: no checkpoint in {directory} can be "
                     f"read ({bad}: {why}); start a new --run_dir")
  return None
