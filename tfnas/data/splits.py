"""Splits: the fixed search split, and the :class:`Split` objects the
training loops turn into per-epoch pipelines."""

from __future__ import annotations

from typing import Optional

import numpy as np
import tensorflow as tf

from tfnas.data.pipeline import make_dataset
from tfnas.data.registry import (AugmentConfig, DataError, DatasetInfo,
                                 check_split, get_entry, load_split)

# Fixed seed of the search-train / search-val split. It is deliberately
# independent of the run seed so that every run searches on the same split.
SEARCH_SPLIT_SEED = 1234


def split_indices(num_examples: int, train_portion: float = 0.5,
                  seed: int = SEARCH_SPLIT_SEED
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Splits ``range(num_examples)`` into two disjoint index sets.

  The indices are permuted with ``seed`` and the first
  ``floor(train_portion * num_examples)`` form the first set.

  Raises:
    DataError: If ``train_portion`` is not in ``(0, 1)`` or a part would
      be empty.
  """
  if not 0.0 < train_portion < 1.0:
    raise DataError(
        f"train_portion={train_portion!r} must lie strictly between 0 and "
        "1 (e.g. 0.5).")
  num_first = int(np.floor(train_portion * num_examples))
  if num_first < 1 or num_first >= num_examples:
    raise DataError(
        f"train_portion={train_portion} of {num_examples} examples leaves "
        "an empty part; choose a portion closer to 0.5.")
  perm = np.random.default_rng(seed).permutation(num_examples)
  return perm[:num_first], perm[num_first:]


def search_splits(name: str, train_portion: float = 0.5, *,
                  data_dir: Optional[str] = None,
                  manual_dir: Optional[str] = None,
                  allow_download: bool = False,
                  seed: int = SEARCH_SPLIT_SEED):
  """Splits a training set into search-train and search-val parts.

  The split is a fixed-seed permutation (independent of the run seed), so
  all runs search on the same examples; the test split is never touched.

  Args:
    name: Registered dataset name.
    train_portion: Fraction of the training set used for search-train;
      the rest is search-val.
    data_dir: See :func:`load_split`.
    manual_dir: See :func:`load_split`.
    allow_download: See :func:`load_split`.
    seed: Seed of the split permutation; keep the default.

  Returns:
    ``((train_images, train_labels), (val_images, val_labels))``.

  Raises:
    DataError: Bad ``train_portion`` or dataset problems.
  """
  if not 0.0 < train_portion < 1.0:  # Checked before loading anything.
    raise DataError(
        f"train_portion={train_portion!r} must lie strictly between 0 and "
        "1 (e.g. 0.5).")
  images, labels = load_split(name, "train", data_dir=data_dir,
                              manual_dir=manual_dir,
                              allow_download=allow_download)
  first, rest = split_indices(len(labels), train_portion, seed)
  return (images[first], labels[first]), (images[rest], labels[rest])


class Split:
  """One split of a dataset, ready to be turned into per-epoch pipelines.

  The loops only use this interface, so a split may be in memory
  (:class:`ArraySplit`) or streamed from disk (``tfnas.data_imagenet``).

  Attributes:
    info: The dataset's description.
    num_examples: Examples in the split (one epoch).
  """

  info: DatasetInfo
  num_examples: int

  def dataset(self, *, batch_size: int, training: bool, epoch: int = 0,
              seed: int = 0, augment: Optional[AugmentConfig] = None,
              skip_batches: int = 0,
              input_context: Optional[tf.distribute.InputContext] = None,
              drop_remainder: Optional[bool] = None) -> tf.data.Dataset:
    """The pipeline of one epoch; arguments as in :func:`make_dataset`."""
    raise NotImplementedError

  def distribute(self, strategy: tf.distribute.Strategy, **kwargs):
    """:meth:`dataset` once per input pipeline of ``strategy``.

    ``kwargs`` are those of :meth:`dataset` except ``input_context``;
    ``batch_size`` is the global batch.
    """
    return strategy.distribute_datasets_from_function(
        lambda ctx: self.dataset(input_context=ctx, **kwargs))


class ArraySplit(Split):
  """A split held in memory as numpy arrays (see :func:`make_dataset`)."""

  def __init__(self, images, labels, info: DatasetInfo):
    self.images, self.labels = images, labels
    self.info = info
    self.num_examples = len(labels)

  def dataset(self, **kwargs) -> tf.data.Dataset:
    return make_dataset(self.images, self.labels, self.info, **kwargs)


def open_split(name: str, split: str, data_dir: Optional[str] = None,
               manual_dir: Optional[str] = None,
               allow_download: bool = False) -> Split:
  """A whole split of a registered dataset, in memory or streamed.

  Arguments and errors as in :func:`load_split`; streamed datasets (e.g.
  ``imagenet2012``) are opened without reading their examples.
  """
  entry = get_entry(name)
  if entry.opener is None:
    images, labels = load_split(name, split, data_dir, manual_dir,
                                allow_download)
    return ArraySplit(images, labels, entry.info)
  check_split(name, split)
  return entry.opener(split, None, data_dir=data_dir, manual_dir=manual_dir,
                      allow_download=allow_download)


def open_search_splits(name: str, train_portion: float = 0.5, *,
                       data_dir: Optional[str] = None,
                       manual_dir: Optional[str] = None,
                       allow_download: bool = False) -> tuple[Split, Split]:
  """The search-train and search-val parts of a training set as splits.

  In-memory datasets use :func:`search_splits` (a fixed-seed permutation);
  streamed datasets take the first ``floor(train_portion * N)`` records of
  the (already shuffled) prepared training split and the rest.
  """
  entry = get_entry(name)
  if entry.opener is None:
    (xa, ya), (xb, yb) = search_splits(
        name, train_portion, data_dir=data_dir, manual_dir=manual_dir,
        allow_download=allow_download)
    return ArraySplit(xa, ya, entry.info), ArraySplit(xb, yb, entry.info)
  if not 0.0 < train_portion < 1.0:
    raise DataError(
        f"train_portion={train_portion!r} must lie strictly between 0 and "
        "1 (e.g. 0.5).")
  kwargs = dict(data_dir=data_dir, manual_dir=manual_dir,
                allow_download=allow_download)
  whole = entry.opener("train", None, **kwargs)
  num_first = int(np.floor(train_portion * whole.num_examples))
  if num_first < 1 or num_first >= whole.num_examples:
    raise DataError(
        f"train_portion={train_portion} of {whole.num_examples} examples "
        "leaves an empty part; choose a portion closer to 0.5.")
  return (entry.opener("train", (0, num_first), **kwargs),
          entry.opener("train", (num_first, whole.num_examples), **kwargs))
