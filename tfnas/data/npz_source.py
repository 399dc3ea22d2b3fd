"""A user's own images from a NumPy file: the dataset ``npz:PATH``.

The file holds the arrays of ``keras.datasets``' ``load_data()`` layout,
saved with ``np.savez(PATH, x_train=..., y_train=..., x_test=...,
y_test=...)``:

* ``x_train``, ``x_test``: square images ``(N, H, H)`` or ``(N, H, H, C)``.
  Integer arrays are read as 0-255, float arrays as 0-1, unless the file
  also holds a scalar ``pixel_max`` (e.g. 16 for scikit-learn's digits,
  65535 for 16-bit images);
* ``y_train``, ``y_test``: integer class indices ``(N,)`` (or ``(N, 1)``);
* optionally ``class_names``: one string per class, copied into exported
  models' metadata.json so a client can name a prediction.

The mean and standard deviation that normalise the inputs are measured on
``x_train``. Each split is shuffled once, with a fixed seed, when read (a
file sorted by class would otherwise give one-class batches to evaluations
with batch statistics and to BN recalibration). The classes are ``0 .. max label`` (or as many as
``class_names``). Nothing is registered in :data:`DATASETS`: the name is
resolved whenever it is asked for. A run saves it with the absolute path
and a fingerprint of the content (`tfnas.dataset_names.saved_name`), so its
resumption and its export read the same file, or refuse one that changed;
what a run keeps of it and how a resume compares it: `npz_runs`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import zipfile

from absl import logging
import numpy as np

from tfnas import dataset_names
from tfnas.data.registry import DataError, DatasetEntry, DatasetInfo

REQUIRED = ("x_train", "y_train", "x_test", "y_test")
_HOW = ("an npz dataset is np.savez(PATH, x_train=..., y_train=..., "
        "x_test=..., y_test=...), see README \"Your own data\"")
# Bytes of float64 per chunk when measuring the mean and standard deviation.
_CHUNK_BYTES = 1 << 26
# Classes per label value in use beyond which (without class_names) the
# labels are taken for ids (e.g. 1000, 2000), not class indices 0..K-1.
_SPARSE_LABELS = 2
# Seed of the one shuffle each split gets when read.
_ORDER_SEED = 0

is_npz_name = dataset_names.is_npz_name


def check_file(name: str) -> str:
  """The absolute path of ``name``'s file, which must exist and, when the
  name holds a fingerprint (as a run saves it), still have that content."""
  path, saved = dataset_names.split_name(name)
  if not path.strip():
    raise DataError(f"dataset {name} names no file; write "
                    f"--dataset=npz:/path/to/data.npz ({_HOW})")
  path = dataset_names.file_path(name)
  if not os.path.isfile(path):
    what = "is a directory" if os.path.isdir(path) else "does not exist"
    again = (" (put the file the run read back there; a --resume may name "
             "it at another path)" if saved else f"; {_HOW}")
    raise DataError(f"dataset file {path} {what}{again}")
  if saved is not None:
    try:
      now = dataset_names.file_fingerprint(path)
    except OSError as e:
      raise DataError(f"dataset file {path} cannot be read ({e})") from None
    if now != saved:
      raise DataError(
          f"dataset file {path} changed since the run read it (content "
          f"sha256 {saved}..., now {now}...): its images, labels or "
          "normalisation may differ from the run's; put back the file the "
          "run used")
  return path


def entry(name: str) -> DatasetEntry:
  """The dataset entry of ``npz:PATH[#sha256:HEX]``, read and checked
  (cached per file version: a file rewritten or replaced is read again)."""
  path = check_file(name)
  _, saved = dataset_names.split_name(name)
  canonical = dataset_names.npz_name(path, saved)
  version = file_version(path)
  read = _entry(path, *version)
  # What was read is the version checked: a file replaced or rewritten
  # since `check_file` (or while being read) would otherwise pass for the
  # content the fingerprint names.
  if file_version(path) != version:
    raise DataError(f"dataset file {path} changed while it was read; run "
                    "again once it is written")
  if saved is not None and dataset_names.file_fingerprint(path) != saved:
    check_file(name)  # Says how it changed.
  info = dataclasses.replace(read.info, name=canonical)
  return dataclasses.replace(read, info=info)


def file_version(path: str) -> tuple[int, ...]:
  """What changes when a file is rewritten or replaced: size, times, inode
  (a `DataError` when it cannot be read)."""
  try:
    status = os.stat(path)
  except OSError as e:
    raise DataError(f"dataset file {path} cannot be read ({e})") from None
  return (status.st_size, status.st_mtime_ns, status.st_ctime_ns,
          status.st_ino)


@dataclasses.dataclass(frozen=True)
class _Split:
  images: np.ndarray  # (N, H, W, C) uint8, or float32 in [0, 255].
  labels: np.ndarray  # (N,) int64.


@functools.lru_cache(maxsize=1)
def _entry(path: str, *unused_version) -> DatasetEntry:
  arrays = _read(path)
  floats = [arrays[key].dtype.kind == "f" for key in ("x_train", "x_test")]
  if "pixel_max" not in arrays and floats[0] != floats[1]:
    raise DataError(f"{path}: x_train has dtype {arrays['x_train'].dtype} "
                    f"but x_test {arrays['x_test'].dtype}; integer images are "
                    "read as 0-255 and float ones as 0-1, so use one kind "
                    "for both")
  pixel_max = _pixel_max(path, arrays)
  splits = {}
  for split in ("train", "test"):
    images = _images(path, f"x_{split}", arrays[f"x_{split}"], pixel_max)
    labels = _labels(path, f"y_{split}", arrays[f"y_{split}"])
    if len(labels) != len(images):
      raise DataError(f"{path}: x_{split} holds {len(images)} images but "
                      f"y_{split} {len(labels)} labels")
    # Files are often sorted by class, and some readers take batches in
    # order: evaluation with batch statistics (SNAS, DSNAS) and BN
    # recalibration would see one class per batch. One fixed shuffle.
    order = np.random.default_rng([_ORDER_SEED, len(splits)]).permutation(
        len(labels))
    splits[split] = _Split(images[order], labels[order])
  train, test = splits["train"], splits["test"]
  if train.images.shape[1:] != test.images.shape[1:]:
    raise DataError(f"{path}: x_train images are {_shape(train.images)} but "
                    f"x_test images {_shape(test.images)}; both splits need "
                    "one image shape")
  num_classes = int(max(train.labels.max(), test.labels.max())) + 1
  class_names = _class_names(path, arrays, num_classes)
  num_classes = max(num_classes, len(class_names))
  if num_classes < 2:
    raise DataError(f"{path}: every label is 0; a classifier needs at least "
                    "two classes")
  _check_classes(path, train.labels, test.labels, num_classes, class_names)
  mean, std = _moments(train.images)
  for channel, value in enumerate(std):
    if value == 0:
      raise DataError(f"{path}: channel {channel} of x_train has the same "
                      "value in every pixel; it cannot be normalised")
  info = DatasetInfo(
      name=dataset_names.npz_name(path), image_size=train.images.shape[1],
      channels=train.images.shape[3], num_classes=num_classes, mean=mean,
      std=std, num_train=len(train.labels), num_test=len(test.labels),
      source_pixel_max=pixel_max, class_names=class_names)

  for split in splits.values():  # Shared by every caller: read-only.
    split.images.flags.writeable = False
    split.labels.flags.writeable = False

  def loader(split, **unused_kwargs):
    return splits[split].images, splits[split].labels

  return DatasetEntry(info=info, loader=loader)


def _read(path: str) -> dict[str, np.ndarray]:
  try:
    with open(path, "rb") as f:
      magic = f.read(6)
    if magic == b"\x93NUMPY":
      raise DataError(f"{path} holds one array (.npy), not named arrays; "
                      f"{_HOW}")
    if not magic.startswith(b"PK"):  # .npz files are zip archives.
      raise DataError(f"{path} is not a NumPy .npz file; {_HOW}")
    loaded = np.load(path, allow_pickle=False)
    with loaded as npz:
      missing = [key for key in REQUIRED if key not in npz.files]
      if missing:
        found = ", ".join(sorted(npz.files)) or "no arrays"
        raise DataError(f"{path} has no {', '.join(missing)} (it holds "
                        f"{found}); {_HOW}")
      arrays = {key: npz[key] for key in npz.files
                if key in REQUIRED + ("pixel_max", "class_names")}
    for key, value in arrays.items():
      if not isinstance(value, np.ndarray):  # A member that is no .npy.
        raise DataError(f"{path}: its member {key} is not a NumPy array; "
                        f"{_HOW}")
    return arrays
  except DataError:
    raise
  except ValueError as e:
    if "allow_pickle" in str(e):
      raise DataError(f"{path} holds pickled Python objects, which tfnas "
                      "does not load; store numeric arrays (and "
                      "class_names as a string array)") from None
    raise DataError(f"{path} is not a NumPy .npz file ({e})") from None
  except (OSError, EOFError, zipfile.BadZipFile) as e:
    raise DataError(f"{path} is not a readable NumPy .npz file ({e})"
                    ) from None
  except Exception as e:  # pylint: disable=broad-except
    # A damaged compressed member fails in zlib or numpy's header parser.
    raise DataError(f"{path} is a damaged NumPy .npz file "
                    f"({type(e).__name__}: {e})") from None


def _pixel_max(path: str, arrays: dict[str, np.ndarray]) -> float:
  if "pixel_max" in arrays:
    value = arrays["pixel_max"]
    if (value.shape != () or value.dtype.kind not in "uif"
            or not 0 < float(value) < np.inf):
      raise DataError(f"{path}: pixel_max must be one positive number "
                      f"(got {value!r})")
    return float(value)
  return 1.0 if arrays["x_train"].dtype.kind == "f" else 255.0


def _shape(images: np.ndarray) -> str:
  return "x".join(str(n) for n in images.shape[1:])


def _images(path: str, key: str, images: np.ndarray,
            pixel_max: float) -> np.ndarray:
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[0] == 0 or min(images.shape) == 0:
    raise DataError(f"{path}: {key} has shape {images.shape}; expected "
                    "(N, H, W) or (N, H, W, C) with N > 0 images")
  if images.shape[1] != images.shape[2]:
    if images.shape[1] <= 4 and images.shape[2] == images.shape[3]:
      raise DataError(f"{path}: {key} has shape {images.shape}, channels "
                      "first; tfnas reads (N, H, W, C): store "
                      "np.transpose(x, (0, 2, 3, 1))")
    raise DataError(f"{path}: {key} images are {images.shape[1]}x"
                    f"{images.shape[2]}; tfnas searches square images: crop "
                    "or resize them (tools/images_to_npz.py --size does)")
  if images.dtype.kind not in "uif":
    raise DataError(f"{path}: {key} has dtype {images.dtype}; images need "
                    "an integer or float dtype")
  low, high = images.min(), images.max()
  if not (np.isfinite(low) and np.isfinite(high)):
    raise DataError(f"{path}: {key} holds NaN or infinite values")
  if low < 0:
    raise DataError(f"{path}: {key} holds negative values (down to {low:g});"
                    f" pixels lie in 0..pixel_max ({pixel_max:g} here): "
                    "shift and scale them into it, e.g. (x + 1) / 2 for "
                    "-1..1 floats")
  if high > pixel_max:
    hint = ("float images are read as 0-1: store 0-255 images as uint8, or "
            "add pixel_max=255 to the file" if images.dtype.kind == "f" else
            "add the largest possible value as pixel_max to the file")
    raise DataError(f"{path}: {key} values reach {high:g}, above "
                    f"{pixel_max:g}; {hint}")
  if pixel_max == 255 and images.dtype.kind in "ui":
    return images.astype(np.uint8, copy=False)
  scaled = images.astype(np.float32)  # One copy, scaled in place.
  scaled *= np.float32(255.0 / pixel_max)
  return scaled


def _labels(path: str, key: str, labels: np.ndarray) -> np.ndarray:
  if labels.ndim == 2 and labels.shape[1] == 1:
    labels = labels[:, 0]
  if labels.ndim != 1:
    hint = ("; one-hot labels: store y.argmax(axis=1)"
            if labels.ndim == 2 else "")
    raise DataError(f"{path}: {key} has shape {labels.shape}; expected one "
                    f"class index per image, (N,){hint}")
  if labels.dtype.kind not in "ui":
    raise DataError(f"{path}: {key} has dtype {labels.dtype}; labels are "
                    "integer class indices (y.astype(np.int64))")
  if len(labels) and labels.min() < 0:
    raise DataError(f"{path}: {key} holds the negative label "
                    f"{labels.min()}; classes are numbered from 0")
  if len(labels) and labels.max() > np.iinfo(np.int32).max:
    raise DataError(f"{path}: {key} holds the label {labels.max()}; labels "
                    "are class indices 0..K-1: renumber them with "
                    "np.unique(y, return_inverse=True)")
  return labels.astype(np.int64)


def _check_classes(path: str, train: np.ndarray, test: np.ndarray,
                   num_classes: int, class_names: tuple[str, ...]) -> None:
  """Refuses labels that are ids rather than class indices (most of
  0..K-1 unused); warns of classes without training images, and of
  trained classes without test images."""
  used = np.union1d(np.unique(train), np.unique(test))
  if (not class_names and num_classes > _SPARSE_LABELS * len(used) and
      num_classes > len(used) + 2):
    raise DataError(
        f"{path}: the labels use {len(used)} distinct values up to "
        f"{num_classes - 1}, so the classifier would have {num_classes} "
        "outputs, most never seen; labels are class indices 0..K-1: "
        "renumber them with np.unique(y, return_inverse=True), or give "
        "class_names to keep that many classes")
  trained = np.unique(train)
  missing = np.setdiff1d(np.arange(num_classes), trained)
  if len(missing):
    logging.warning("%s: %d of %d classes have no training image (%s); "
                    "the network cannot learn them", path, len(missing),
                    num_classes, _named(missing, class_names))
  untested = np.setdiff1d(trained, np.unique(test))
  if len(untested):
    logging.warning("%s: %d of %d classes have no test image (%s); the "
                    "accuracy measured on the test split leaves them out",
                    path, len(untested), num_classes,
                    _named(untested, class_names))


def _named(classes: np.ndarray, class_names: tuple[str, ...]) -> str:
  """Up to ten classes by name (or index), for a warning."""
  named = [class_names[i] if class_names else str(i) for i in classes]
  return ", ".join(named[:10]) + (", ..." if len(named) > 10 else "")


def _class_names(path: str, arrays: dict[str, np.ndarray],
                 num_classes: int) -> tuple[str, ...]:
  if "class_names" not in arrays:
    return ()
  names = arrays["class_names"]
  if names.ndim != 1 or names.dtype.kind not in "US":
    raise DataError(f"{path}: class_names must be a 1-D string array "
                    f"(got dtype {names.dtype}, shape {names.shape})")
  try:
    names = tuple(n.decode() if isinstance(n, bytes) else str(n)
                  for n in names.tolist())
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: class_names holds bytes that are not UTF-8 "
                    f"({e.reason}); store them as str") from None
  if len(names) < num_classes:
    raise DataError(f"{path}: {len(names)} class_names for labels up to "
                    f"{num_classes - 1}; name every class")
  if any(not n.strip() for n in names) or len(set(names)) < len(names):
    raise DataError(f"{path}: class_names must be distinct and not empty "
                    "(a client reads a prediction's class by its name)")
  return names


def _moments(images: np.ndarray) -> tuple[tuple[float, ...], ...]:
  """Per-channel mean and standard deviation of ``images / 255``, summed in
  float64 over chunks of at most `_CHUNK_BYTES` (no float64 copy of the
  whole split)."""
  channels = images.shape[-1]
  total = np.zeros(channels)
  squares = np.zeros(channels)
  per_image = images[0].size * 8
  step = max(1, _CHUNK_BYTES // per_image)
  for start in range(0, len(images), step):
    chunk = images[start:start + step].astype(np.float64)
    chunk /= 255.0
    total += chunk.sum(axis=(0, 1, 2))
    np.square(chunk, out=chunk)
    squares += chunk.sum(axis=(0, 1, 2))
  count = images.shape[0] * images.shape[1] * images.shape[2]
  mean = total / count
  variance = np.maximum(squares / count - np.square(mean), 0.0)
  std = np.sqrt(variance)
  # Round-off of a constant channel leaves a tiny positive variance.
  std[std < 1e-7] = 0.0
  return tuple(mean.tolist()), tuple(std.tolist())
