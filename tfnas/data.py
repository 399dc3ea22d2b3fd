"""Datasets and deterministic, resumable ``tf.data`` input pipelines.

This module provides:

* a small registry of datasets (:data:`DATASETS`) mapping a name to its
  :class:`DatasetInfo` and a loader; new datasets plug in with
  :func:`register_dataset`;
* loaders for the embedded scikit-learn ``digits`` set (the default, no
  download), a deterministic ``synthetic`` set, and the ``tensorflow_datasets``
  sets ``cifar10``, ``cifar100`` and ``svhn_cropped`` (which are never
  downloaded implicitly);
* the fixed search split (:func:`search_splits`) used by architecture search;
* :func:`make_dataset`, the one-epoch training/evaluation pipeline, whose
  randomness (shuffle order and augmentation) is a pure function of
  ``(seed, epoch, example index)``. Epoch ``e`` of a run therefore always
  yields the same batches, a resumed run can skip straight to a step, and the
  global batches are the same whatever the number of replicas on one machine.

Nothing here reads command-line flags: everything comes in as arguments or as
small frozen dataclasses.
"""

from __future__ import annotations


import contextlib
import dataclasses
import functools
import os
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from tfnas.errors import TfnasError

__all__ = [
    "ArraySplit",
    "AugmentConfig",
    "DATASETS",
    "DataError",
    "DatasetEntry",
    "DatasetInfo",
    "SEARCH_SPLIT_SEED",
    "Split",
    "dataset_info",
    "default_augment",
    "distributed_dataset",
    "load_split",
    "make_dataset",
    "open_search_splits",
    "open_split",
    "register_dataset",
    "register_synthetic",
    "search_splits",
    "split_indices",
    "steps_per_epoch",
    "synthetic_data",
    "synthetic_info",
]

SPLITS = ("train", "test")

# Fixed seed of the search-train / search-val split. It is deliberately
# independent of the run seed so that every run searches on the same split.
SEARCH_SPLIT_SEED = 1234

# Fixed seed of the digits train/test split.
_DIGITS_SPLIT_SEED = 0
_DIGITS_NUM_TEST = 300

# Tags that separate the random streams derived from one (seed, epoch).
SHUFFLE_TAG = 0
CROP_TAG = 1
FLIP_TAG = 2
CUTOUT_TAG = 3


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
    """

    name: str
    image_size: int
    channels: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_train: int
    num_test: int

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

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape ``(H, W, C)`` of one image."""
        return (self.image_size, self.image_size, self.channels)


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


def _entry(name: str) -> DatasetEntry:
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise DataError(
            f"unknown dataset {name!r}; known datasets: "
            f"{', '.join(sorted(DATASETS))}.") from None


def dataset_info(name: str) -> DatasetInfo:
    """Returns the :class:`DatasetInfo` of a registered dataset.

    Raises:
        DataError: If ``name`` is not registered (the message lists the known
            names).
    """
    return _entry(name).info


def default_augment(name: str, cutout: int = 0) -> AugmentConfig:
    """Returns the standard training augmentation of a dataset.

    Args:
        name: Registered dataset name.
        cutout: Cutout side to add (0 for none).
    """
    return dataclasses.replace(_entry(name).augment, cutout=cutout)


def _check_split(name: str, split: str) -> None:
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
    entry = _entry(name)
    _check_split(name, split)
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


# ---------------------------------------------------------------------------
# digits (scikit-learn, embedded)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
    digits = load_digits()
    images = (digits.images.astype(np.float32) * (255.0 / 16.0))[..., None]
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
                     num_train=1497, num_test=_DIGITS_NUM_TEST),
    loader=_load_digits,
    augment=AugmentConfig(pad_crop=1)))


# ---------------------------------------------------------------------------
# synthetic


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


# ---------------------------------------------------------------------------
# tensorflow_datasets


@contextlib.contextmanager
def _tfds_quiet():
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
    with _tfds_quiet():
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
            f"{_tfds_where(data_dir)} is empty; re-prepare the dataset.")
    images = np.concatenate([c[0] for c in chunks])
    labels = np.concatenate([c[1] for c in chunks])
    return images, labels.astype(np.int64)


def _tfds_where(data_dir: Optional[str]) -> str:
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

    builder = tfds.builder(tfds_name, data_dir=data_dir)
    if not builder.is_prepared() and (manual_dir or allow_download):
        if manual_dir and not allow_download:
            missing = [a for a in archives
                       if not os.path.exists(os.path.join(manual_dir, a))]
            if missing:
                raise DataError(
                    f"dataset {tfds_name!r} is not prepared in "
                    f"{_tfds_where(data_dir)} and --manual_dir {manual_dir} "
                    f"lacks {', '.join(missing)}; put the archives there, or "
                    "pass allow_download=True.")
        config = tfds.download.DownloadConfig(
            manual_dir=manual_dir, try_download_gcs=allow_download)
        builder.download_and_prepare(download_config=config)
    return builder


def read_tfds(builder, archives: Sequence[str], data_dir: Optional[str],
              **as_dataset_kwargs) -> tf.data.Dataset:
    """``builder.as_dataset(**as_dataset_kwargs)``; missing data is a
    :class:`DataError` saying how to provide it (``as_dataset`` never
    downloads)."""
    try:
        return builder.as_dataset(**as_dataset_kwargs)
    except AssertionError as err:
        if "could not find data" not in str(err):
            raise
        raise DataError(
            f"dataset {builder.name!r} is not prepared in "
            f"{_tfds_where(data_dir)} (looked for {builder.data_dir}); run "
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
               archives=("train_32x32.mat", "test_32x32.mat", "extra_32x32.mat"),
               augment=AugmentConfig(pad_crop=4))


# ---------------------------------------------------------------------------
# search split


def split_indices(num_examples: int, train_portion: float = 0.5,
                  seed: int = SEARCH_SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
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


# ---------------------------------------------------------------------------
# splits: what the training loops consume


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
    entry = _entry(name)
    if entry.opener is None:
        images, labels = load_split(name, split, data_dir, manual_dir,
                                    allow_download)
        return ArraySplit(images, labels, entry.info)
    _check_split(name, split)
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
    entry = _entry(name)
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


# ---------------------------------------------------------------------------
# pipelines


def steps_per_epoch(num_examples: int, global_batch: int,
                    drop_remainder: bool = True) -> int:
    """Number of global batches in one epoch of :func:`make_dataset`.

    Also exact with several input pipelines: the shards are truncated to a
    common length, which never loses a full global batch.
    """
    if global_batch < 1:
        raise DataError(f"global_batch={global_batch} must be positive.")
    if num_examples < 0:
        raise DataError(f"num_examples={num_examples} must be non-negative.")
    if drop_remainder:
        return num_examples // global_batch
    return -(-num_examples // global_batch)


def derived_seed(seed: int, epoch: int, tag: int) -> int:
    """A 63-bit integer derived from (seed, epoch, tag)."""
    state = np.random.SeedSequence([seed, epoch, tag]).generate_state(
        2, np.uint32)
    return int(((int(state[0]) << 32) | int(state[1])) & ((1 << 63) - 1))


def _check_arrays(images, labels, info: DatasetInfo):
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4 or images.shape[1:] != info.input_shape:
        raise DataError(
            f"images of shape {images.shape} do not match dataset "
            f"{info.name!r}; expected (N, {', '.join(map(str, info.input_shape))}).")
    if labels.shape != (images.shape[0],):
        raise DataError(
            f"labels of shape {labels.shape} do not match {images.shape[0]} "
            "images; pass one integer label per image.")
    if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise DataError(
            f"labels span [{labels.min()}, {labels.max()}] but dataset "
            f"{info.name!r} has {info.num_classes} classes.")
    if images.dtype != np.uint8:
        images = images.astype(np.float32)
    return images, labels.astype(np.int32)


def check_pipeline_args(*, batch_size, epoch, seed, skip_batches, augment,
                        training, drop_remainder):
    """Validates the common pipeline arguments of :meth:`Split.dataset`.

    Returns:
        ``(augment, drop_remainder)`` with their defaults filled in.
    """
    for field, value, low in (("batch_size", batch_size, 1), ("epoch", epoch, 0),
                              ("seed", seed, 0),
                              ("skip_batches", skip_batches, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                or value < low:
            raise DataError(
                f"{field}={value!r} must be an integer >= {low}.")
    if augment is None:
        augment = AugmentConfig()
    if not isinstance(augment, AugmentConfig):
        raise DataError(
            f"augment={augment!r} must be an AugmentConfig or None.")
    if drop_remainder is None:
        drop_remainder = training
    return augment, drop_remainder


def pipeline_layout(batch_size: int,
                    input_context: Optional[tf.distribute.InputContext]):
    """How a global batch is spread over input pipelines and replicas.

    Returns:
        ``(num_pipelines, pipeline_id, per_replica_batch,
        replicas_per_pipeline)``.
    """
    if input_context is None:
        return 1, 0, batch_size, 1
    num_pipelines = input_context.num_input_pipelines
    replicas = input_context.num_replicas_in_sync
    if replicas % num_pipelines:
        raise DataError(
            f"{replicas} replicas cannot be spread evenly over "
            f"{num_pipelines} input pipelines; use the same number of "
            "devices on every worker.")
    if batch_size % replicas:
        raise DataError(
            f"global batch_size={batch_size} is not divisible by the "
            f"{replicas} replicas; use a multiple of {replicas}.")
    return (num_pipelines, input_context.input_pipeline_id,
            input_context.get_per_replica_batch_size(batch_size),
            replicas // num_pipelines)


def normalize(images: tf.Tensor, info: DatasetInfo) -> tf.Tensor:
    """Scales ``[0, 255]`` images to ``[0, 1]`` and standardises them with
    the dataset's per-channel mean and std."""
    images = tf.cast(images, tf.float32) / 255.0
    mean = tf.constant(info.mean, tf.float32)
    std = tf.constant(info.std, tf.float32)
    return (images - mean) / std


def cutout(image: tf.Tensor, size: int, seed: tf.Tensor) -> tf.Tensor:
    """Zeros a ``size`` square (clipped at the borders) with a random centre."""
    height, width = image.shape[0], image.shape[1]
    centre = tf.random.stateless_uniform(
        [2], seed, minval=0, maxval=height, dtype=tf.int32)  # Square images.
    cy, cx = centre[0], centre[1]
    top, left = cy - size // 2, cx - size // 2
    rows = tf.range(height)[:, None]
    cols = tf.range(width)[None, :]
    inside = ((rows >= top) & (rows < top + size)
              & (cols >= left) & (cols < left + size))
    return tf.where(inside[:, :, None], tf.zeros_like(image), image)


def _augment_fn(info: DatasetInfo, augment: AugmentConfig, seed: int,
                epoch: int):
    """Per-example augmentation keyed on (seed, epoch, example index)."""
    keys = {tag: tf.constant(derived_seed(seed, epoch, tag), tf.int64)
            for tag in (CROP_TAG, FLIP_TAG, CUTOUT_TAG)}
    shape = list(info.input_shape)
    pad = augment.pad_crop

    def apply(image: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
        image = tf.cast(image, tf.float32)
        if pad:
            image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
            image = tf.image.stateless_random_crop(
                image, shape, seed=tf.stack([keys[CROP_TAG], index]))
        if augment.flip:
            image = tf.image.stateless_random_flip_left_right(
                image, seed=tf.stack([keys[FLIP_TAG], index]))
        image = normalize(image, info)
        if augment.cutout:
            image = cutout(image, augment.cutout,
                            tf.stack([keys[CUTOUT_TAG], index]))
        return tf.ensure_shape(image, shape)

    return apply


def make_dataset(images, labels, info: DatasetInfo, *, batch_size: int,
                 training: bool, epoch: int = 0, seed: int = 0,
                 augment: Optional[AugmentConfig] = None,
                 skip_batches: int = 0,
                 input_context: Optional[tf.distribute.InputContext] = None,
                 drop_remainder: Optional[bool] = None) -> tf.data.Dataset:
    """Builds the input pipeline for ONE epoch.

    Training: the whole set is shuffled with a permutation derived from
    ``(seed, epoch)``, each example is augmented with stateless ops seeded by
    ``(seed, epoch, example index)``, then normalised and batched. The result
    depends only on ``(seed, epoch)``: epoch ``e`` always yields the same
    batches, and a resumed run passes ``skip_batches`` to continue mid-epoch.
    Evaluation: natural order, no random augmentation, normalisation only.

    Distribution: with ``input_context`` (from
    :func:`distributed_dataset`), ``batch_size`` is the GLOBAL batch. Every
    input pipeline computes the same epoch permutation and keeps every
    ``num_input_pipelines``-th example starting at ``input_pipeline_id``
    (when training, the shards are truncated to a common length so that all
    workers run the same number of steps). Each pipeline batches its share
    of a global batch (``global / num_input_pipelines``) and splits it into
    per-replica batches (``input_context.get_per_replica_batch_size``). With
    one input pipeline (e.g. ``MirroredStrategy`` on one machine) the
    replicas' batches of a step, concatenated in replica order, are exactly
    the batch the default strategy produces for the same seed and epoch.
    With several pipelines (multi-worker) each worker sees a disjoint shard
    of the epoch's permutation, so a global batch contains different
    examples than the single-worker batch, but still only depends on
    ``(seed, epoch)`` and the number of workers.

    Args:
        images: ``(N, H, W, C)`` uint8 or float in ``[0, 255]``.
        labels: ``(N,)`` integer labels.
        info: Dataset description (shape check, mean/std for normalisation).
        batch_size: Global batch size.
        training: Shuffle and augment (True) or evaluate (False).
        epoch: Epoch number (>= 0), part of the shuffle/augmentation seed.
        seed: Run seed (>= 0).
        augment: Training augmentation; ignored when evaluating. ``None``
            means no random augmentation.
        skip_batches: Number of global batches (steps) of this epoch to skip,
            to resume mid-epoch. Skipping happens on example indices before
            any image is loaded, which is equivalent to skipping batches after
            batching.
        input_context: ``tf.distribute.InputContext`` when called by
            ``strategy.distribute_datasets_from_function``.
        drop_remainder: Drop the last partial batch. ``None`` (default) means
            True for training and False for evaluation.

    Returns:
        A ``tf.data.Dataset`` of ``(images, labels)``: float32 NHWC normalised
        images and int32 labels, per-replica batches under ``input_context``.

    Raises:
        DataError: Bad arguments (shapes, labels, batch size, seeds, ...).
    """
    images, labels = _check_arrays(images, labels, info)
    augment, drop_remainder = check_pipeline_args(
        batch_size=batch_size, epoch=epoch, seed=seed,
        skip_batches=skip_batches, augment=augment, training=training,
        drop_remainder=drop_remainder)
    num_pipelines, pipeline_id, per_replica, replicas_per_pipeline = (
        pipeline_layout(batch_size, input_context))
    pipeline_batch = per_replica * replicas_per_pipeline

    num = len(labels)
    if training:
        order = np.random.default_rng(
            derived_seed(seed, epoch, SHUFFLE_TAG)).permutation(num)
    else:
        order = np.arange(num)
    if num_pipelines > 1:
        order = order[pipeline_id::num_pipelines]
        if drop_remainder:
            order = order[:num // num_pipelines]
    if drop_remainder and len(order) < pipeline_batch:
        raise DataError(
            f"batch_size={batch_size} exceeds the {num} examples, so an epoch "
            "with drop_remainder has no batch; lower batch_size.")
    order = order[skip_batches * pipeline_batch:]

    images_t = tf.constant(images)
    labels_t = tf.constant(labels)
    ds = tf.data.Dataset.from_tensor_slices(order.astype(np.int64))
    if training and not augment.is_identity:
        augment_one = _augment_fn(info, augment, seed, epoch)
        ds = ds.map(
            lambda i: (augment_one(tf.gather(images_t, i), i),
                       tf.gather(labels_t, i)),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(pipeline_batch, drop_remainder=drop_remainder)
    else:
        ds = ds.batch(pipeline_batch, drop_remainder=drop_remainder)
        ds = ds.map(
            lambda idx: (normalize(tf.gather(images_t, idx), info),
                         tf.gather(labels_t, idx)),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if replicas_per_pipeline > 1:
        ds = ds.rebatch(per_replica, drop_remainder=drop_remainder)
    return ds.prefetch(tf.data.AUTOTUNE)


def distributed_dataset(
        strategy: tf.distribute.Strategy,
        dataset_fn: Callable[[tf.distribute.InputContext], tf.data.Dataset],
        options: Optional[tf.distribute.InputOptions] = None):
    """Distributes a per-input-pipeline dataset function over ``strategy``.

    Args:
        strategy: The distribution strategy.
        dataset_fn: Called once per input pipeline with its
            ``tf.distribute.InputContext``; typically
            ``lambda ctx: make_dataset(..., input_context=ctx)``.
        options: Optional ``tf.distribute.InputOptions``.

    Returns:
        A ``tf.distribute.DistributedDataset`` of per-replica batches.
    """
    return strategy.distribute_datasets_from_function(dataset_fn, options)


# Streamed datasets register themselves in their own module (it needs the
# names above).
from tfnas import data_imagenet  # pylint: disable=wrong-import-position,unused-import,cyclic-import
