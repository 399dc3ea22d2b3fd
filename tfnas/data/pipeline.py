"""The one-epoch ``tf.data`` pipeline, deterministic and resumable: its
shuffle order and augmentation are pure functions of
``(seed, epoch, example index)``."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from tfnas.data.registry import AugmentConfig, DataError, DatasetInfo

# Tags that separate the random streams derived from one (seed, epoch).
SHUFFLE_TAG = 0
CROP_TAG = 1
FLIP_TAG = 2
CUTOUT_TAG = 3


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
        f"{info.name!r}; expected "
        f"(N, {', '.join(map(str, info.input_shape))}).")
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
