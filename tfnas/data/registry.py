"""The dataset registry: what a dataset is and how it is loaded.

A registered dataset is a :class:`DatasetEntry`: its static
:class:`DatasetInfo`, its standard training :class:`AugmentConfig`, and
either an in-memory ``loader`` or a streaming ``opener``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, Optional

from absl import logging
import numpy as np

from tfnas.errors import TfnasError

if TYPE_CHECKING:
  from tfnas.data.splits import Split

SPLITS = ("train", "test")



class DataError(TfnasError):
  """A dataset or pipeline was requested with an invalid configuration."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static description of an image-classification dataset.

  Attributes:
    name: Registry name of the dataset.
    image_size: Height and width of the (square) images in pixels.
    channels: Number of image channels.
    num_classes: Number of classes; labels lie in ``[0, num_classes)``.
    mean: Per-channel mean of the training images scaled to ``[0, 1]``.
    std: Per-channel standard deviation of the training images scaled to
      ``[0, 1]``.
    num_train: Nominal number of training examples.
    num_test: Nominal number of test examples.
    source_pixel_max: Largest pixel value of the dataset as published; the
      loader rescales it to 255 (scikit-learn's digits: 16).
    class_names: The name of each class, by label, where the dataset gives
      them (empty otherwise).
  """

  name: str
  image_size: int
  channels: int
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  num_train: int
  num_test: int
  source_pixel_max: float = 255.0
  class_names: tuple[str, ...] = ()

  def __post_init__(self):
    for field in ("image_size", "channels", "num_classes"):
      value = getattr(self, field)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise DataError(
            f"DatasetInfo {self.name!r}: {field}={value!r} must be a "
            "positive integer.")
    object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
    object.__setattr__(self, "std", tuple(float(s) for s in self.std))
    if len(self.mean) != self.channels or len(self.std) != self.channels:
      raise DataError(
          f"DatasetInfo {self.name!r}: mean {self.mean} and std "
          f"{self.std} need one value per channel ({self.channels}).")
    if any(s <= 0 for s in self.std):
      raise DataError(
          f"DatasetInfo {self.name!r}: std {self.std} must be positive.")
    if not 0 < self.source_pixel_max < float("inf"):
      raise DataError(
          f"DatasetInfo {self.name!r}: source_pixel_max "
          f"{self.source_pixel_max} must be positive and finite.")
    object.__setattr__(self, "class_names",
                       tuple(str(n) for n in self.class_names))
    if self.class_names and len(self.class_names) != self.num_classes:
      raise DataError(
          f"DatasetInfo {self.name!r}: {len(self.class_names)} class_names "
          f"for {self.num_classes} classes.")

  @property
  def input_shape(self) -> tuple[int, int, int]:
    """Shape ``(H, W, C)`` of one image."""
    return (self.image_size, self.image_size, self.channels)

  def input_metadata(self) -> dict:
    """An export's metadata.json facts about its input: shape, the
    normalisation, and the dataset's largest published pixel value (served
    inputs are 0-255: multiply the dataset's by ``255 / source_pixel_max``);
    and ``class_names`` (output index to name) where the dataset has them.
    """
    facts = {"input_shape": list(self.input_shape), "mean": list(self.mean),
             "std": list(self.std),
             "source_pixel_max": float(self.source_pixel_max)}
    if self.class_names:
      facts["class_names"] = list(self.class_names)
    return facts


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Training-time data augmentation.

  Normalisation (scale to ``[0, 1]``, subtract ``mean``, divide by ``std``)
  is always applied and is not part of this config.

  Attributes:
    pad_crop: Pixels of zero padding added on every side before a random
      crop back to the original size (4 for CIFAR); 0 disables it.
    flip: Whether to flip images left-right with probability 1/2.
    cutout: Side of the Cutout square (DeVries & Taylor, 2017); 0 disables
      it. The square's centre is uniform over the image, the square is
      clipped at the borders, and the pixels are set to 0 after
      normalisation.
  """

  pad_crop: int = 0
  flip: bool = False
  cutout: int = 0

  def __post_init__(self):
    for field in ("pad_crop", "cutout"):
      value = getattr(self, field)
      if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
              or value < 0):
        raise DataError(
            f"AugmentConfig.{field}={value!r} must be a non-negative "
            "integer (0 disables it).")
    if not isinstance(self.flip, (bool, np.bool_)):
      raise DataError(f"AugmentConfig.flip={self.flip!r} must be a bool.")

  @property
  def is_identity(self) -> bool:
    """True when no random augmentation is configured."""
    return not (self.pad_crop or self.flip or self.cutout)

  @classmethod
  def of_run(cls, config, image_size: int) -> "AugmentConfig":
    """The augmentation a run config sets (``pad_crop``, ``flip``,
    ``cutout``) for its ``dataset``'s ``image_size`` images, refused or
    warned of as `check_fits` says (warnings logged)."""
    augment = cls(pad_crop=config.pad_crop, flip=config.flip,
                  cutout=config.cutout)
    for warning in augment.check_fits(image_size, config.dataset):
      logging.warning("%s", warning)
    return augment

  def check_fits(self, image_size: int, dataset: str) -> list[str]:
    """Refuses augmentation that can erase a whole ``image_size`` image of
    ``dataset`` (messages name the flags, --cutout and --pad_crop); returns
    warnings for settings that hide much of it (more than the CIFAR
    recipe's cutout of half the side or padding of an eighth).

    Raises:
      DataError: a cutout square as wide as the image (from 2·side − 1 on
        it covers every image), or padding as wide (a crop can then be all
        padding).
    """
    side = f"{image_size}x{image_size}"
    hint = ("; flags/train_digits.cfg holds settings for 8x8 digits"
            if dataset == "digits" else "")
    for flag, value in (("cutout", self.cutout), ("pad_crop", self.pad_crop)):
      if value >= image_size:
        what = ("a square that can cover a whole image" if flag == "cutout"
                else "a random crop that can be all padding")
        raise DataError(
            f"--{flag}={value} is not smaller than the {side} images of "
            f"{dataset}: {what}; use at most {image_size // 2} "
            f"(or 0: off){hint}")
    warnings = []
    if self.cutout > image_size // 2:
      warnings.append(f"--cutout={self.cutout} hides more than half the "
                      f"side of the {side} images of {dataset} (CIFAR-10's "
                      f"16 is half of 32){hint}")
    if self.pad_crop > max(image_size // 8, 1):
      warnings.append(f"--pad_crop={self.pad_crop} shifts the {side} "
                      f"images of {dataset} by more than an eighth of their "
                      f"side (CIFAR-10's 4 is an eighth of 32){hint}")
    return warnings


Loader = Callable[..., tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
  """A registered dataset.

  Attributes:
    info: Its static description.
    loader: ``loader(split, *, data_dir, manual_dir, allow_download)``
      returning ``(images, labels)``: images ``(N, H, W, C)`` uint8 or
      float in ``[0, 255]``, labels ``(N,)`` int64.
    augment: Standard training augmentation for this dataset.
    opener: For datasets streamed from disk instead of ``loader``:
      ``opener(split, record_range, *, data_dir, manual_dir,
      allow_download)`` returning a :class:`Split`; ``record_range`` is
      ``None`` (the whole split) or ``(start, stop)`` record indices.
  """

  info: DatasetInfo
  loader: Optional[Loader]
  augment: AugmentConfig = AugmentConfig()
  opener: Optional[Callable[..., "Split"]] = None

  def __post_init__(self):
    if (self.loader is None) == (self.opener is None):
      raise DataError(
          f"dataset {self.info.name!r} needs exactly one of loader "
          "(in memory) and opener (streamed).")


DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(entry: DatasetEntry, *, overwrite: bool = False) -> None:
  """Adds a dataset to :data:`DATASETS` under ``entry.info.name``.

  Args:
    entry: The dataset to register.
    overwrite: Replace an existing entry of the same name.

  Raises:
    DataError: If the name is taken and ``overwrite`` is False.
  """
  name = entry.info.name
  if name in DATASETS and not overwrite:
    raise DataError(
        f"dataset {name!r} is already registered; pass overwrite=True to "
        "replace it or choose another name.")
  DATASETS[name] = entry


def get_entry(name: str) -> DatasetEntry:
  """The :class:`DatasetEntry` of ``name``: a registered dataset, or a
  NumPy file ``npz:PATH`` (`tfnas.data.npz_source`, read on first use). A
  :class:`DataError` lists the known names if there is none."""
  from tfnas.data import npz_source  # pylint: disable=import-outside-toplevel
  if npz_source.is_npz_name(name):
    return npz_source.entry(name)
  try:
    return DATASETS[name]
  except (KeyError, TypeError):
    raise DataError(
        f"unknown dataset {name!r}; known datasets: "
        f"{', '.join(sorted(DATASETS))}, or npz:PATH (a NumPy file of your "
        "own images).") from None


def dataset_info(name: str) -> DatasetInfo:
  """Returns the :class:`DatasetInfo` of a registered dataset.

  Raises:
    DataError: If ``name`` is not registered (the message lists the known
      names).
  """
  return get_entry(name).info


def default_augment(name: str, cutout: int = 0) -> AugmentConfig:
  """Returns the standard training augmentation of a dataset.

  Args:
    name: Registered dataset name.
    cutout: Cutout side to add (0 for none).
  """
  return dataclasses.replace(get_entry(name).augment, cutout=cutout)


def check_split(name: str, split: str) -> None:
  if split not in SPLITS:
    raise DataError(
        f"unknown split {split!r} for dataset {name!r}; use one of "
        f"{', '.join(SPLITS)}.")


def load_split(name: str, split: str, data_dir: Optional[str] = None,
               manual_dir: Optional[str] = None,
               allow_download: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Loads a whole split of a registered dataset into memory.

  Args:
    name: Registered dataset name (see :data:`DATASETS`).
    split: ``'train'`` or ``'test'``.
    data_dir: tfds data directory (tfds datasets only; ``None`` means the
      tfds default).
    manual_dir: Directory holding the original archives, used to prepare
      a tfds dataset that is not prepared yet, without network access.
    allow_download: Allow tfds to download the archives from the network
      when the dataset is not prepared. Off by default: offline, tfds
      would retry for minutes before failing.

  Returns:
    ``(images, labels)``: images ``(N, H, W, C)`` (uint8, or float in
    ``[0, 255]``), labels ``(N,)`` int64.

  Raises:
    DataError: Unknown name or split, or a tfds dataset that is not
      prepared and cannot be prepared from ``manual_dir``.
  """
  entry = get_entry(name)
  check_split(name, split)
  if entry.loader is None:
    raise DataError(
        f"dataset {name!r} is streamed from disk and is never loaded into "
        "memory; use open_split.")
  images, labels = entry.loader(split, data_dir=data_dir,
                                manual_dir=manual_dir,
                                allow_download=allow_download)
  info = entry.info
  if images.ndim != 4 or images.shape[1:] != info.input_shape:
    raise DataError(
        f"loader of {name!r} returned images of shape {images.shape}; "
        f"expected (N, {', '.join(map(str, info.input_shape))}).")
  return images, np.asarray(labels, dtype=np.int64)
