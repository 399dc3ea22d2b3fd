"""``tensorflow_datasets`` sets (cifar10, cifar100, svhn_cropped), read
from prepared tfds directories and never downloaded implicitly: offline, a
missing set is one :class:`DataError` saying how to provide it."""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from tfnas.data.registry import (AugmentConfig, DataError, DatasetEntry,
                                 DatasetInfo, register_dataset)


@contextlib.contextmanager
def quiet_tfds():
  """tfds logs its probing of a missing dataset at WARNING/INFO; our own
  error message replaces that chatter."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  previous = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(previous)


def _load_tfds(split: str, **kwargs) -> tuple[np.ndarray, np.ndarray]:
  with quiet_tfds():
    return _load_tfds_quietly(split, **kwargs)


def _load_tfds_quietly(split: str, *, tfds_name: str, archives: Sequence[str],
                       data_dir: Optional[str], manual_dir: Optional[str],
                       allow_download: bool) -> tuple[np.ndarray, np.ndarray]:
  """Loads a prepared tfds split into numpy, never downloading implicitly."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  builder = prepared_tfds_builder(tfds_name, archives, data_dir=data_dir,
                                  manual_dir=manual_dir,
                                  allow_download=allow_download)
  # Not batch_size=-1: with unknown split sizes (e.g. under
  # tfds.testing.mock_data) tfds would batch by sys.maxsize and abort.
  data = read_tfds(builder, archives, data_dir, split=split,
                   as_supervised=True, shuffle_files=False)
  chunks = list(tfds.as_numpy(data.batch(4096)))
  if not chunks:
    raise DataError(
        f"split {split!r} of dataset {tfds_name!r} in "
        f"{tfds_location(data_dir)} is empty; re-prepare the dataset.")
  images = np.concatenate([c[0] for c in chunks])
  labels = np.concatenate([c[1] for c in chunks])
  return images, labels.astype(np.int64)


def tfds_location(data_dir: Optional[str]) -> str:
  return (data_dir or os.environ.get("TFDS_DATA_DIR")
          or "the tfds default data dir")


def prepared_tfds_builder(tfds_name: str, archives: Sequence[str], *,
                          data_dir: Optional[str], manual_dir: Optional[str],
                          allow_download: bool):
  """The tfds builder of ``tfds_name``, prepared if that can be done offline.

  A builder that is not prepared is prepared only from ``manual_dir`` (when
  it holds all the ``archives``) or, with ``allow_download``, from the
  network. Otherwise it is returned as is: :func:`read_tfds` then fails at
  once with a :class:`DataError`. (Reading rather than refusing on
  ``is_prepared()`` also lets ``tfds.testing.mock_data`` work: it patches
  reading but not ``is_prepared``.)
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  try:
    builder = tfds.builder(tfds_name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    # A damaged dataset_info.json in the version folder tfds found: an
    # AssertionError about proto versions, a JSON or protobuf parse error.
    # Anything else (permissions, an unknown name) keeps its own message.
    if not (isinstance(e, (AssertionError, ValueError)) or
            type(e).__module__.startswith("google.protobuf")):
      raise
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    raise DataError(
        f"dataset {tfds_name!r} in {tfds_location(data_dir)} cannot be "
        f"read ({type(e).__name__}: {reason}); its version folder's "
        "dataset_info.json is damaged or from another tfds: remove that "
        f"folder and prepare it again with {' and '.join(archives)} in "
        "--manual_dir, or point --data_dir at a complete prepared "
        "copy.") from None
  if not builder.is_prepared() and (manual_dir or allow_download):
    if manual_dir and not allow_download:
      missing = [a for a in archives
                 if not os.path.exists(os.path.join(manual_dir, a))]
      if missing:
        raise DataError(
            f"dataset {tfds_name!r} is not prepared in "
            f"{tfds_location(data_dir)} and --manual_dir {manual_dir} "
            f"lacks {', '.join(missing)}; put the archives there (tfds "
            "reads them offline), or point --data_dir at a prepared copy.")
    config = tfds.download.DownloadConfig(
        manual_dir=manual_dir, try_download_gcs=allow_download)
    try:
      builder.download_and_prepare(download_config=config)
    except Exception as e:  # pylint: disable=broad-except
      # tfds raises many kinds (checksum mismatch, a bad tar, no network):
      # each is one line for the user, who has to fix the archives anyway.
      reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
      if manual_dir:
        files = ("is the original, complete file" if len(archives) == 1
                 else "are the original, complete files")
        where = f"the archives in --manual_dir {manual_dir}"
        advice = (f"check that {' and '.join(archives)} {files} and that "
                  "the data dir is writable")
      else:
        where = "a download"
        advice = (f"check the connection, or put {' and '.join(archives)} "
                  "in --manual_dir")
      raise DataError(
          f"preparing dataset {tfds_name!r} in {tfds_location(data_dir)} "
          f"from {where} failed ({type(e).__name__}: {reason}); {advice}, "
          "or point --data_dir at a prepared copy.") from None
  return builder


def read_tfds(builder, archives: Sequence[str], data_dir: Optional[str],
              **as_dataset_kwargs) -> tf.data.Dataset:
  """``builder.as_dataset(**as_dataset_kwargs)``; missing data is a
  :class:`DataError` saying how to provide it (``as_dataset`` never
  downloads)."""
  try:
    return builder.as_dataset(**as_dataset_kwargs)
  except KeyError as err:
    # A version folder without its splits: an interrupted preparation or
    # a partial copy, which tfds takes for prepared data.
    if "splits" not in str(err):
      raise
    raise DataError(
        f"dataset {builder.name!r}: {builder.data_dir} holds no prepared "
        "splits (an interrupted preparation or a partial copy?); remove "
        "that folder and prepare it again with "
        f"{' and '.join(archives)} in --manual_dir, or point --data_dir at "
        "a complete prepared copy.") from None
  except AssertionError as err:
    if "could not find data" not in str(err):
      raise
    raise DataError(
        f"dataset {builder.name!r} is not prepared in "
        f"{tfds_location(data_dir)} (looked for {builder.data_dir}); run "
        "with --data_dir pointing at a prepared tfds directory, or put "
        f"{' and '.join(archives)} in --manual_dir to prepare it "
        "offline.") from None


def _register_tfds(name: str, *, mean, std, num_classes: int, num_train: int,
                   num_test: int, archives: Sequence[str],
                   augment: AugmentConfig) -> None:
  register_dataset(DatasetEntry(
      info=DatasetInfo(name=name, image_size=32, channels=3,
                       num_classes=num_classes, mean=mean, std=std,
                       num_train=num_train, num_test=num_test),
      loader=functools.partial(_load_tfds, tfds_name=name,
                               archives=tuple(archives)),
      augment=augment))


_register_tfds("cifar10", mean=(0.4914, 0.4822, 0.4465),
               std=(0.2470, 0.2435, 0.2616), num_classes=10, num_train=50000,
               num_test=10000, archives=("cifar-10-binary.tar.gz",),
               augment=AugmentConfig(pad_crop=4, flip=True))
_register_tfds("cifar100", mean=(0.5071, 0.4865, 0.4409),
               std=(0.2673, 0.2564, 0.2762), num_classes=100, num_train=50000,
               num_test=10000, archives=("cifar-100-binary.tar.gz",),
               augment=AugmentConfig(pad_crop=4, flip=True))
# tfds prepares all three SVHN splits, so all three files are needed.
_register_tfds("svhn_cropped", mean=(0.4377, 0.4438, 0.4728),
               std=(0.1980, 0.2010, 0.1970), num_classes=10, num_train=73257,
               num_test=26032,
               archives=("train_32x32.mat", "test_32x32.mat",
                         "extra_32x32.mat"),
               augment=AugmentConfig(pad_crop=4))
