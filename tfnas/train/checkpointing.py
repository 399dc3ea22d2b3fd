"""What a search checkpoint holds of a Keras network: all of its variables.

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
position in ``model.variables`` (deterministic for a given architecture;
variable *paths* are not: Keras numbers random-generator states by a
process-wide counter).

`restore_problem` restores objects from a checkpoint prefix given by a user,
or says in one line why it does not fit (without TensorFlow's flood of
"unrestored value" warnings).
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf

from tfnas.errors import TfnasError


class ModelVariables(tf.Module):
  """Every variable of ``model`` (weights, BN statistics, RNG states)."""

  def __init__(self, model, name: str = "model_variables"):
    super().__init__(name=name)
    self.values = {f"v{i:05d}": getattr(v, "value", v)
                   for i, v in enumerate(model.variables)}


def resolve_checkpoint(run_dir: str, checkpoint: str | None,
                       remedy: str) -> str:
  """``checkpoint``, or the latest one under ``run_dir/ckpt`` when None.

  Raises:
    TfnasError: no checkpoint there yet (the message ends with ``remedy``),
      or ``checkpoint`` has no ``.index`` file.
  """
  if checkpoint is None:
    latest = tf.train.latest_checkpoint(os.path.join(run_dir, "ckpt"))
    if latest is None:
      raise TfnasError(f"{run_dir}/ckpt holds no checkpoint yet; {remedy}")
    return latest
  if not tf.io.gfile.exists(checkpoint + ".index"):
    raise TfnasError(f"checkpoint {checkpoint} not found (no "
                     f"{os.path.basename(checkpoint)}.index)")
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
  except (AssertionError, ValueError, tf.errors.OpError) as e:
    problem = str(e).strip().splitlines()[0][:300]
  return problem
