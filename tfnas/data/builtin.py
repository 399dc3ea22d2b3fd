"""Datasets that need no download: scikit-learn's embedded ``digits`` and
a deterministic ``synthetic`` set."""

from __future__ import annotations

import functools

import numpy as np

from tfnas.data.registry import (SPLITS, AugmentConfig, DataError,
                                 DatasetEntry, DatasetInfo, register_dataset)

# Fixed seed of the digits train/test split.
_DIGITS_SPLIT_SEED = 0
_DIGITS_NUM_TEST = 300
# scikit-learn's digits are 0-16; the loader scales them to 0-255.
_DIGITS_PIXEL_MAX = 16.0


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  digits = load_digits()
  images = (digits.images.astype(np.float32) * (255.0 / _DIGITS_PIXEL_MAX)
            )[..., None]
  labels = digits.target.astype(np.int64)
  perm = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(labels))
  for array in (images, labels, perm):
    array.flags.writeable = False
  return images, labels, perm


def _load_digits(split: str, **unused_kwargs) -> tuple[np.ndarray, np.ndarray]:
  images, labels, perm = _digits_arrays()
  num_train = len(labels) - _DIGITS_NUM_TEST
  idx = perm[:num_train] if split == "train" else perm[num_train:]
  return images[idx], labels[idx]


register_dataset(DatasetEntry(
    info=DatasetInfo(name="digits", image_size=8, channels=1, num_classes=10,
                     mean=(0.305710,), std=(0.376068,),
                     num_train=1497, num_test=_DIGITS_NUM_TEST,
                     source_pixel_max=_DIGITS_PIXEL_MAX),
    loader=_load_digits,
    augment=AugmentConfig(pad_crop=1)))


def synthetic_data(split: str, *, image_size: int = 8, channels: int = 3,
                   num_classes: int = 10, num_train: int = 256,
                   num_test: int = 64,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Generates a deterministic synthetic image-classification split.

  Every class has a fixed random mean pattern (shared by both splits); an
  image is its class pattern plus independent Gaussian noise, clipped to
  ``[0, 255]``, so a model can learn far above chance.

  Args:
    split: ``'train'`` or ``'test'``.
    image_size: Height and width of the images.
    channels: Number of channels.
    num_classes: Number of classes.
    num_train: Number of training examples.
    num_test: Number of test examples.
    seed: Seed of the class patterns and of the examples.

  Returns:
    ``(images, labels)``: uint8 ``(N, image_size, image_size, channels)``
    and int64 ``(N,)``.
  """
  if split not in SPLITS:
    raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}.")
  for field, value in (("image_size", image_size), ("channels", channels),
                       ("num_classes", num_classes), ("num_train", num_train),
                       ("num_test", num_test)):
    if value < 1:
      raise DataError(f"synthetic {field}={value} must be positive.")
  shape = (image_size, image_size, channels)
  patterns = np.random.default_rng([seed, 0]).uniform(
      -1.0, 1.0, size=(num_classes,) + shape)
  num = num_train if split == "train" else num_test
  rng = np.random.default_rng([seed, 1 if split == "train" else 2])
  labels = rng.permutation(np.arange(num) % num_classes).astype(np.int64)
  images = 127.5 + 64.0 * patterns[labels] + 40.0 * rng.standard_normal(
      (num,) + shape)
  return np.clip(np.round(images), 0, 255).astype(np.uint8), labels


@functools.lru_cache(maxsize=16)
def synthetic_info(name: str = "synthetic", *, image_size: int = 8,
                   channels: int = 3, num_classes: int = 10,
                   num_train: int = 256, num_test: int = 64,
                   seed: int = 0) -> DatasetInfo:
  """Returns the :class:`DatasetInfo` of :func:`synthetic_data` arguments.

  Mean and std are measured on the generated training split.
  """
  images, _ = synthetic_data(
      "train", image_size=image_size, channels=channels,
      num_classes=num_classes, num_train=num_train, num_test=num_test,
      seed=seed)
  scaled = images.astype(np.float64) / 255.0
  return DatasetInfo(
      name=name, image_size=image_size, channels=channels,
      num_classes=num_classes,
      mean=tuple(scaled.mean(axis=(0, 1, 2))),
      std=tuple(scaled.std(axis=(0, 1, 2))),
      num_train=num_train, num_test=num_test)


def register_synthetic(name: str, *, overwrite: bool = False,
                       **kwargs) -> DatasetInfo:
  """Registers a synthetic dataset with non-default shape or size.

  Args:
    name: Registry name.
    overwrite: Replace an existing entry of the same name.
    **kwargs: Arguments of :func:`synthetic_data` (image_size, channels,
      num_classes, num_train, num_test, seed).

  Returns:
    The registered dataset's info.
  """
  info = synthetic_info(name, **kwargs)

  def loader(split, **unused_kwargs):
    return synthetic_data(split, **kwargs)

  register_dataset(DatasetEntry(info=info, loader=loader),
                   overwrite=overwrite)
  return info


register_synthetic("synthetic")
