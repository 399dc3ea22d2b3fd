"""Datasets and deterministic, resumable ``tf.data`` input pipelines.

This package provides:

* a small registry of datasets (:data:`DATASETS`) mapping a name to its
  :class:`DatasetInfo` and a loader; new datasets plug in with
  :func:`register_dataset`;
* loaders for the embedded scikit-learn ``digits`` set (the default, no
  download), a deterministic ``synthetic`` set, and the ``tensorflow_datasets``
  sets ``cifar10``, ``cifar100`` and ``svhn_cropped`` (which are never
  downloaded implicitly), and a user's own NumPy file, ``npz:PATH``
  (``npz_source``, resolved by name rather than registered; what a run
  keeps of it and how a resume compares it: ``npz_runs``);
* the fixed search split (:func:`search_splits`) used by architecture search;
* :func:`make_dataset`, the one-epoch training/evaluation pipeline, whose
  randomness (shuffle order and augmentation) is a pure function of
  ``(seed, epoch, example index)``. Epoch ``e`` of a run therefore always
  yields the same batches, a resumed run can skip straight to a step, and the
  global batches are the same whatever the number of replicas on one machine.

The package: ``registry`` (what a dataset is), ``builtin`` (digits,
synthetic), ``tfds_source`` (tensorflow_datasets sets), ``splits`` (the search
split and :class:`Split`), ``pipeline`` (:func:`make_dataset`); everything
public is importable from ``tfnas.data``. Streamed ImageNet lives in
``tfnas.data_imagenet`` and registers itself on import.

Nothing here reads command-line flags: everything comes in as arguments or as
small frozen dataclasses.
"""

from __future__ import annotations

from tfnas.data import builtin, tfds_source  # Registers their datasets.
from tfnas.data.builtin import (register_synthetic, synthetic_data,
                                synthetic_info)
from tfnas.data.npz_runs import (RECORD as DATASET_RECORD,
                                 check_saved_dataset,
                                 record as dataset_record, recorded_info,
                                 run_dataset_info)
from tfnas.data.pipeline import (CROP_TAG, CUTOUT_TAG,
                                 FLIP_TAG, SHUFFLE_TAG, check_pipeline_args,
                                 cutout, derived_seed, distributed_dataset,
                                 make_dataset, normalize, pipeline_layout,
                                 steps_per_epoch)
from tfnas.data.registry import (DATASETS, SPLITS, AugmentConfig, DataError,
                                 DatasetEntry, DatasetInfo, Loader,
                                 dataset_info, default_augment, get_entry,
                                 load_split, register_dataset)
from tfnas.data.splits import (SEARCH_SPLIT_SEED, ArraySplit, Split,
                               open_search_splits, open_split, search_splits,
                               split_indices)
from tfnas.data.tfds_source import prepared_tfds_builder, read_tfds

__all__ = [
    "ArraySplit",
    "AugmentConfig",
    "CROP_TAG",
    "CUTOUT_TAG",
    "DATASETS",
    "DATASET_RECORD",
    "DataError",
    "DatasetEntry",
    "DatasetInfo",
    "FLIP_TAG",
    "Loader",
    "SEARCH_SPLIT_SEED",
    "SHUFFLE_TAG",
    "SPLITS",
    "Split",
    "builtin",
    "check_pipeline_args",
    "check_saved_dataset",
    "cutout",
    "data_imagenet",
    "dataset_info",
    "dataset_record",
    "default_augment",
    "derived_seed",
    "distributed_dataset",
    "get_entry",
    "load_split",
    "make_dataset",
    "normalize",
    "open_search_splits",
    "open_split",
    "pipeline_layout",
    "prepared_tfds_builder",
    "read_tfds",
    "recorded_info",
    "run_dataset_info",
    "register_dataset",
    "register_synthetic",
    "search_splits",
    "split_indices",
    "steps_per_epoch",
    "synthetic_data",
    "synthetic_info",
    "tfds_source",
]

# Streamed datasets register themselves in their own module (it needs the
# names above).
from tfnas import data_imagenet  # pylint: disable=wrong-import-position,unused-import,cyclic-import
