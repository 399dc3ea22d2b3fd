"""SavedModel export of a derived network for TF Serving.

``export_saved_model(model, base_path, metadata=..., genotype=...)`` writes

    base_path/<version>/saved_model.pb, variables/   (the SavedModel)
    base_path/<version>/assets.extra/genotype.json   (when a genotype is given)
    base_path/<version>/assets.extra/metadata.json

so ``model_base_path=base_path`` serves it with TF Serving (which loads the
highest numeric version). ``genotype.json`` and ``metadata.json`` are also
written directly into ``base_path/<version>/`` for people and tools.

Serving contract (signature ``serving_default``):

* input ``images``: float32 ``[batch, H, W, C]`` with the dataset's image
  size and channels (``metadata["input_shape"]``), raw pixel values in
  ``[0, 255]`` (what ``tfnas.data`` loaders return before normalisation);
* the exported function normalises inside: ``(images / 255 - mean) / std``
  with the dataset's per-channel mean and std (``metadata``);
* outputs ``logits`` and ``probabilities`` (softmax), float32
  ``[batch, num_classes]``; the model runs in inference mode (moving BN
  statistics, no drop-path, no auxiliary head).

An existing version directory is never overwritten: exporting the same model
again (same weights, genotype and metadata: same fingerprint) returns the
existing path, a different model raises :class:`ExportError`. Without a
version the model goes one above the highest version, unless that version
already holds it (an export repeated is not a new version). The version
is written to a hidden temporary directory and renamed into place, so TF
Serving never sees a partial version.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import numpy as np
import tensorflow as tf

from tfnas import dataset_names
from tfnas import ops
from tfnas.errors import TfnasError
from tfnas.genotype import RANDOM_OPS
from tfnas.train import rundir

SIGNATURE = "serving_default"
REQUIRED_METADATA = ("input_shape", "mean", "std")


class ExportError(TfnasError):
  """The export cannot be written as asked; the message says why."""


class _ServingModule(tf.Module):
  """Wraps the Keras model with the normalisation and a fixed signature."""

  def __init__(self, model, input_shape, mean, std):
    super().__init__(name="tfnas_serving")
    self.model = model
    self._mean = tf.constant(mean, tf.float32)
    self._std = tf.constant(std, tf.float32)
    self._shape = (None, *input_shape)
    spec = tf.TensorSpec(self._shape, tf.float32, name="images")
    self.serve = tf.function(self._serve, input_signature=[spec])

  def _serve(self, images):
    # A signature called directly (a loaded SavedModel's `signatures[...]`,
    # TF Serving) does not check the shape of its input: without this a
    # wrong rank reaches kernels that abort the process and a wrong size
    # yields wrong outputs. Now either is an InvalidArgumentError.
    images = tf.ensure_shape(images, self._shape)
    x = (images / 255.0 - self._mean) / self._std
    logits = tf.cast(self.model(x, training=False), tf.float32)
    return {"logits": logits, "probabilities": tf.nn.softmax(logits)}


# Measurements of the model, not part of it: the same model exported again
# with another (or no) measurement is the same model.
MEASURED_METADATA = ("val_acc", "val_loss", "val_split", "val_examples",
                     "val_unmeasured")
# Facts of the dataset, which the fingerprint covers by its name; leaving
# them out keeps the fingerprints of exports written before they were added.
DATASET_METADATA = ("source_pixel_max",)
# Where the model's sources lay: a run directory copied or moved elsewhere
# (its npz data file too: the fingerprint covers its content) exports the
# same model.
LOCATION_METADATA = ("run_dir", "checkpoint")


def model_fingerprint(model, metadata: Mapping[str, Any],
                      genotype=None, located: bool = False) -> str:
  """SHA-256 of the weights (names, shapes, values), genotype and metadata
  (without its `MEASURED_METADATA`, `DATASET_METADATA` and
  `LOCATION_METADATA`, an npz dataset by its content). ``located``: the
  fingerprint of exports written before 2026-12-05's stop 36, which kept
  the locations in (`export_saved_model` knows both)."""
  return _fingerprints(model, metadata, genotype)[1 if located else 0]


def _fingerprints(model, metadata: Mapping[str, Any],
                  genotype=None) -> tuple[str, str]:
  """`model_fingerprint` without and with ``located``, the weights hashed
  once for both."""
  digest = hashlib.sha256()
  # Derived weights (a noise op's seed, from its path) are no model state:
  # exports from before they existed keep their fingerprints.
  for v in (w for w in model.weights if not ops.is_derived(w)):
    value = np.asarray(v.numpy())
    digest.update(f"{v.path}:{value.dtype}:{value.shape}".encode())
    digest.update(np.ascontiguousarray(value).tobytes())
  if genotype is not None:
    digest.update(json.dumps(genotype.to_dict(), sort_keys=True).encode())
  left_out = MEASURED_METADATA + DATASET_METADATA
  located = {k: v for k, v in metadata.items() if k not in left_out}
  placeless = dataset_names.by_content(
      {k: v for k, v in located.items() if k not in LOCATION_METADATA})
  found = []
  for described in (placeless, located):
    both = digest.copy()
    both.update(json.dumps(described, sort_keys=True).encode())
    found.append(both.hexdigest())
  return found[0], found[1]


def _check_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
  missing = [k for k in REQUIRED_METADATA if k not in metadata]
  if missing:
    raise ExportError(f"metadata lacks {missing}; the serving function needs "
                      f"the input shape and the normalisation mean/std")
  shape = [int(d) for d in metadata["input_shape"]]
  if len(shape) != 3 or min(shape) < 1:
    raise ExportError(f"metadata input_shape {metadata['input_shape']!r} "
                      f"must be [H, W, C]")
  for key in ("mean", "std"):
    if len(metadata[key]) != shape[2]:
      raise ExportError(f"metadata {key} {metadata[key]!r} needs one value "
                        f"per channel ({shape[2]})")
  out = dict(metadata)
  out["input_shape"] = shape
  return out


def existing_versions(base_path: str) -> list[int]:
  """The numbered version folders under ``base_path``, ascending."""
  if not os.path.isdir(base_path):
    return []
  return sorted(int(d) for d in os.listdir(base_path) if d.isdigit())


def exported_versions(base_path: str) -> dict[int, str]:
  """The versions under ``base_path`` that hold a tfnas export, with their
  fingerprints."""
  found = {}
  for version in existing_versions(base_path):
    fingerprint = _read_fingerprint(os.path.join(base_path, str(version)))
    if fingerprint is not None:
      found[version] = fingerprint
  return found


def _read_fingerprint(version_dir: str) -> str | None:
  metadata = version_metadata(version_dir)
  return None if metadata is None else metadata.get("fingerprint")


def version_metadata(version_dir: str) -> dict | None:
  """The metadata.json of an exported version (None: none readable)."""
  try:
    with open(os.path.join(version_dir, "metadata.json")) as f:
      metadata = json.load(f)
  except (OSError, ValueError):
    return None
  return metadata if isinstance(metadata, dict) else None


def check_random_ops(genotype, allow: bool = False) -> list[str]:
  """The ops of ``genotype`` whose output is random at inference
  (`tfnas.genotype.RANDOM_OPS`), sorted.

  Raises:
    ExportError: there are some and ``allow`` is False: a served model
      would answer the same request differently each time.
  """
  used = sorted(set(genotype.ops()) & RANDOM_OPS) if genotype else []
  if used and not allow:
    raise ExportError(
        f"the genotype uses {', '.join(used)}, which draws new random values "
        f"on every call, at inference too: the exported model would give "
        f"different predictions for the same input; pass "
        f"--allow_random_ops to export it anyway, nothing was written")
  return used


def export_saved_model(model, base_path: str, *, metadata: Mapping[str, Any],
                       genotype=None, version: int | None = None,
                       allow_random_ops: bool = False) -> str:
  """Writes ``base_path/<version>/`` (SavedModel + genotype + metadata).

  Args:
    model: a Keras model mapping NORMALISED images ``[B, H, W, C]`` to
      logits; called as ``model(x, training=False)``.
    base_path: the TF Serving ``model_base_path``.
    metadata: JSON-serialisable facts about the model; must contain
      ``input_shape`` ``[H, W, C]``, ``mean`` and ``std`` (per channel, of
      images scaled to ``[0, 1]``). Recommended: ``dataset``,
      ``num_classes``, ``params``. The export adds ``signature``,
      ``input``, ``outputs``, ``version`` and ``fingerprint``.
    genotype: optional architecture, saved as genotype.json: a
      :class:`tfnas.genotype.Genotype` (cells) or a
      :class:`tfnas.block_genotype.BlockGenotype` (a single-path child);
      anything with ``to_dict`` and ``to_json``.
    version: version directory number (>= 1); default: the highest
      existing version when it holds this same model, else one above it (1
      for a new base path).
    allow_random_ops: export a genotype using an op that is random at
      inference (`check_random_ops`); metadata then lists it as
      ``random_ops``.

  Returns:
    The version directory written (or the existing identical one).

  Raises:
    ExportError: bad metadata or version, a random op not allowed, or
      ``base_path/<version>`` holds a different model (nothing is
      overwritten).
  """
  metadata = _check_metadata(metadata)
  random_ops = check_random_ops(genotype, allow_random_ops)
  if random_ops:
    metadata["random_ops"] = random_ops
  # An export written before locations were left out matches by the older
  # rule (a run that has not moved).
  fingerprint, located = _fingerprints(model, metadata, genotype)
  same = {fingerprint, located}
  if version is None:
    versions = existing_versions(base_path)
    version = versions[-1] + 1 if versions else 1
    if versions and _read_fingerprint(
        os.path.join(base_path, str(versions[-1]))) in same:
      version = versions[-1]
  if isinstance(version, bool) or not isinstance(version, int) or version < 1:
    raise ExportError(f"version must be an integer >= 1, got {version!r}")
  target = os.path.join(base_path, str(version))
  if os.path.isdir(target) and not os.listdir(target):
    os.rmdir(target)  # An empty folder holds nothing to keep: written anew.
  if os.path.exists(target):
    existing = _read_fingerprint(target)
    if existing in same:
      return target
    if existing is None:
      raise ExportError(
          f"{target} already exists and is not a tfnas export (no "
          f"metadata.json with a fingerprint); choose another --version or "
          f"--export_dir, nothing was written")
    raise ExportError(
        f"{target} already holds a different model (fingerprint "
        f"{existing[:12]}..., this model {fingerprint[:12]}...); "
        f"choose another --version or --export_dir, nothing was written")
  if os.path.exists(base_path) and not os.path.isdir(base_path):
    raise ExportError(f"export path {base_path} exists and is not a "
                      f"directory")
  try:
    os.makedirs(base_path, exist_ok=True)
  except OSError as e:  # A file on the way, read-only, no space left...
    raise ExportError(f"cannot create the export path {base_path}: "
                      f"{e.strerror or e}") from None
  shape = metadata["input_shape"]
  full_metadata = dict(metadata)
  full_metadata.update(
      signature=SIGNATURE,
      input={"name": "images", "dtype": "float32",
             "shape": [None, *shape], "range": [0, 255],
             "normalisation": "(images / 255 - mean) / std, inside the model"},
      outputs={"logits": "float32 [batch, num_classes]",
               "probabilities": "float32 [batch, num_classes], softmax"},
      version=version, fingerprint=fingerprint)
  module = _ServingModule(model, shape, metadata["mean"], metadata["std"])
  try:
    tmp = tempfile.mkdtemp(dir=base_path, prefix=f".tmp-{version}-")
  except OSError as e:
    raise ExportError(f"cannot write into the export path {base_path}: "
                      f"{e.strerror or e}") from None
  try:
    signature = module.serve.get_concrete_function()
    tf.saved_model.save(module, tmp, signatures={SIGNATURE: signature})
    texts = {"metadata.json": json.dumps(full_metadata, indent=2,
                                         sort_keys=True) + "\n"}
    if genotype is not None:
      texts["genotype.json"] = genotype.to_json() + "\n"
    extra = os.path.join(tmp, "assets.extra")
    os.makedirs(extra, exist_ok=True)
    for name, text in texts.items():
      for directory in (tmp, extra):
        with open(os.path.join(directory, name), "w") as f:
          f.write(text)
    # A temp folder is owner-only; a model server running as another
    # user reads the version folder like any other new folder.
    os.chmod(tmp, rundir.new_dir_mode())
    try:
      os.rename(tmp, target)  # Fails if target appeared meanwhile.
    except OSError as e:
      raise ExportError(f"cannot move the export into {target} ({e}); "
                        f"nothing was overwritten") from None
    tmp = None
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
  return target
