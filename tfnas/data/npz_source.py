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
``x_train``. The classes are ``0 .. max label`` (or as many as
``class_names``). Nothing is registered in :data:`DATASETS`: the name is
resolved whenever it is asked for, so a run's config.json, its resumption
and its export all find the data through the absolute path the name holds
(:func:`canonical_name`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import zipfile

import numpy as np

from tfnas.data.registry import DataError, DatasetEntry, DatasetInfo

PREFIX = "npz:"
REQUIRED = ("x_train", "y_train", "x_test", "y_test")
_HOW = ("an npz dataset is np.savez(PATH, x_train=..., y_train=..., "
        "x_test=..., y_test=...), see README \"Your own data\"")
# Images per chunk when measuring the mean and standard deviation.
_CHUNK = 4096


def is_npz_name(name) -> bool:
  """Whether ``name`` asks for a NumPy file (``npz:PATH``)."""
  return isinstance(name, str) and name.startswith(PREFIX)


def canonical_name(name: str) -> str:
  """``npz:`` and the absolute path of ``name``'s file (``~`` expanded),
  the form a run saves, so that it means the same file from any working
  directory."""
  path = name[len(PREFIX):]
  if not path.strip():
    raise DataError(f"--dataset={name} names no file; write "
                    f"--dataset=npz:/path/to/data.npz ({_HOW})")
  return PREFIX + os.path.abspath(os.path.expanduser(path))


def check_file(name: str) -> str:
  """The canonical name of an existing file (a :class:`DataError` naming the
  path otherwise). Cheap: reads nothing but the file's status."""
  name = canonical_name(name)
  path = name[len(PREFIX):]
  if not os.path.isfile(path):
    what = "is a directory" if os.path.isdir(path) else "does not exist"
    raise DataError(f"--dataset={name}: {path} {what}; {_HOW}")
  return name


def entry(name: str) -> DatasetEntry:
  """The dataset entry of ``npz:PATH``, read and checked (cached per file
  version: a file rewritten in place is read again)."""
  name = check_file(name)
  path = name[len(PREFIX):]
  status = os.stat(path)
  return _entry(path, status.st_mtime_ns, status.st_size)


@dataclasses.dataclass(frozen=True)
class _Split:
  images: np.ndarray  # (N, H, W, C) uint8, or float32 in [0, 255].
  labels: np.ndarray  # (N,) int64.


@functools.lru_cache(maxsize=4)
def _entry(path: str, unused_mtime_ns: int, unused_size: int) -> DatasetEntry:
  arrays = _read(path)
  pixel_max = _pixel_max(path, arrays)
  splits = {}
  for split in ("train", "test"):
    images = _images(path, f"x_{split}", arrays[f"x_{split}"], pixel_max)
    labels = _labels(path, f"y_{split}", arrays[f"y_{split}"])
    if len(labels) != len(images):
      raise DataError(f"{path}: x_{split} holds {len(images)} images but "
                      f"y_{split} {len(labels)} labels")
    splits[split] = _Split(images, labels)
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
  mean, std = _moments(train.images)
  for channel, value in enumerate(std):
    if value == 0:
      raise DataError(f"{path}: channel {channel} of x_train has the same "
                      "value in every pixel; it cannot be normalised")
  info = DatasetInfo(
      name=PREFIX + path, image_size=train.images.shape[1],
      channels=train.images.shape[3], num_classes=num_classes, mean=mean,
      std=std, num_train=len(train.labels), num_test=len(test.labels),
      source_pixel_max=pixel_max, class_names=class_names)

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
      return {key: npz[key] for key in npz.files
              if key in REQUIRED + ("pixel_max", "class_names")}
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


def _pixel_max(path: str, arrays: dict[str, np.ndarray]) -> float:
  if "pixel_max" in arrays:
    value = arrays["pixel_max"]
    if (value.shape != () or not np.issubdtype(value.dtype, np.number)
            or not 0 < float(value) < np.inf):
      raise DataError(f"{path}: pixel_max must be one positive number "
                      f"(got {value!r})")
    return float(value)
  kinds = {arrays[key].dtype.kind for key in ("x_train", "x_test")}
  return 1.0 if kinds & {"f"} else 255.0


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
    raise DataError(f"{path}: {key} images are {images.shape[1]}x"
                    f"{images.shape[2]}; tfnas searches square images: crop "
                    "or resize them (tools/images_to_npz.py --size does)")
  if images.dtype.kind not in "uif":
    raise DataError(f"{path}: {key} has dtype {images.dtype}; images need "
                    "an integer or float dtype")
  low, high = images.min(), images.max()
  if not (np.isfinite(low) and np.isfinite(high)):
    raise DataError(f"{path}: {key} holds NaN or infinite values")
  if low < 0 or high > pixel_max:
    hint = ("float images are read as 0-1: store 0-255 images as uint8, or "
            "add pixel_max=255 to the file" if images.dtype.kind == "f" else
            "add the largest possible value as pixel_max to the file")
    raise DataError(f"{path}: {key} values lie in [{low:g}, {high:g}], "
                    f"outside [0, {pixel_max:g}]; {hint}")
  if images.dtype == np.uint8 and pixel_max == 255:
    return images
  return images.astype(np.float32) * np.float32(255.0 / pixel_max)


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
  return labels.astype(np.int64)


def _class_names(path: str, arrays: dict[str, np.ndarray],
                 num_classes: int) -> tuple[str, ...]:
  if "class_names" not in arrays:
    return ()
  names = arrays["class_names"]
  if names.ndim != 1 or names.dtype.kind not in "US":
    raise DataError(f"{path}: class_names must be a 1-D string array "
                    f"(got dtype {names.dtype}, shape {names.shape})")
  names = tuple(n.decode() if isinstance(n, bytes) else str(n)
                for n in names.tolist())
  if len(names) < num_classes:
    raise DataError(f"{path}: {len(names)} class_names for labels up to "
                    f"{num_classes - 1}; name every class")
  return names


def _moments(images: np.ndarray) -> tuple[tuple[float, ...], ...]:
  """Per-channel mean and standard deviation of ``images / 255``, summed in
  float64 over chunks (no float64 copy of the whole split)."""
  channels = images.shape[-1]
  total = np.zeros(channels)
  squares = np.zeros(channels)
  for start in range(0, len(images), _CHUNK):
    chunk = images[start:start + _CHUNK].astype(np.float64) / 255.0
    total += chunk.sum(axis=(0, 1, 2))
    squares += np.square(chunk).sum(axis=(0, 1, 2))
  count = images.shape[0] * images.shape[1] * images.shape[2]
  mean = total / count
  variance = np.maximum(squares / count - np.square(mean), 0.0)
  std = np.sqrt(variance)
  # Round-off of a constant channel leaves a tiny positive variance.
  std[std < 1e-7] = 0.0
  return tuple(mean.tolist()), tuple(std.tolist())
