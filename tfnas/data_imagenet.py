"""ImageNet (tfds ``imagenet2012``), streamed from disk.

ImageNet does not fit in memory, so unlike the sets of ``tfnas.data`` it is
read record by record from the prepared tfds files (JPEG bytes, decoded in
the pipeline). The recipe is the usual one of DARTS, SNAS and DSNAS:

* training: random-resized crop (area 8%-100% of the image, aspect ratio
  3/4-4/3) resized to 224x224, optional left-right flip, normalisation with
  the ImageNet mean/std, optional Cutout;
* evaluation: shorter side resized to 256, central 224x224 crop.

Determinism as in ``tfnas.data.make_dataset``: the file order, the shuffle
buffer and every example's crop/flip/cutout are seeded by ``(seed, epoch)``
and the example's position in the epoch, so a resumed run skips to the same
point. Unlike the in-memory sets the shuffle is a buffer (``SHUFFLE_BUFFER``
encoded images) over files read in a seeded order, not a full permutation.

With several input pipelines (multi-worker), each reads its own subset of
the files (``tfds.ReadConfig(input_context=...)``); a worker's training
stream repeats its files, so every worker can deliver the common number of
steps per epoch even when file shards differ in size.

Nothing is downloaded implicitly: the data comes from ``--data_dir`` (a
prepared tfds directory) or is prepared offline from the two archives in
``--manual_dir`` (tfds' manual ImageNet preparation).
"""

from __future__ import annotations

import functools
from typing import Optional

import tensorflow as tf

from tfnas import data
from tfnas.data import tfds_source

TFDS_NAME = "imagenet2012"
ARCHIVES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
# tfnas split name -> tfds split name.
TFDS_SPLITS = {"train": "train", "test": "validation"}
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
IMAGE_SIZE = 224
# Evaluation resizes the shorter side to IMAGE_SIZE / EVAL_CROP_FRACTION (256).
EVAL_CROP_FRACTION = 0.875
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
# Encoded images (~110 KB each) held by the training shuffle buffer.
SHUFFLE_BUFFER = 10_000

INFO = data.DatasetInfo(name=TFDS_NAME, image_size=IMAGE_SIZE, channels=3,
                        num_classes=1000, mean=MEAN, std=STD,
                        num_train=1_281_167, num_test=50_000)


def random_resized_crop(encoded: tf.Tensor, size: int,
                        seed: tf.Tensor) -> tf.Tensor:
  """Decodes a random crop of a JPEG and resizes it to ``size x size``.

  The crop covers ``CROP_AREA_RANGE`` of the image area with an aspect ratio
  in ``CROP_ASPECT_RANGE``; after 10 failed attempts it is the whole image.
  Only the crop is decoded.

  Returns:
    float32 ``(size, size, 3)`` in ``[0, 255]``.
  """
  shape = tf.image.extract_jpeg_shape(encoded)
  whole = tf.constant([[[0.0, 0.0, 1.0, 1.0]]])
  begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=whole, seed=seed, min_object_covered=0.0,
      aspect_ratio_range=CROP_ASPECT_RANGE, area_range=CROP_AREA_RANGE,
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], crop[0], crop[1]])
  image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
  return tf.image.resize(image, [size, size], method="bilinear")


def center_crop(encoded: tf.Tensor, size: int) -> tf.Tensor:
  """Decodes a JPEG, resizes its shorter side to ``size / 0.875`` and takes
  the central ``size x size`` crop.

  Returns:
    float32 ``(size, size, 3)`` in ``[0, 255]``.
  """
  image = tf.image.decode_jpeg(encoded, channels=3)
  height = tf.cast(tf.shape(image)[0], tf.float32)
  width = tf.cast(tf.shape(image)[1], tf.float32)
  scale = (size / EVAL_CROP_FRACTION) / tf.minimum(height, width)
  new_h = tf.maximum(size, tf.cast(tf.round(height * scale), tf.int32))
  new_w = tf.maximum(size, tf.cast(tf.round(width * scale), tf.int32))
  image = tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear")
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return tf.ensure_shape(image[top:top + size, left:left + size, :],
                         (size, size, 3))


class TfdsStreamSplit(data.Split):
  """A split of a prepared tfds image dataset, read from disk every epoch.

  Args:
    builder: the prepared tfds builder.
    tfds_split: tfds split string, e.g. ``'train'`` or ``'train[0:1000]'``.
    info: the dataset's description.
    num_examples: records in ``tfds_split``.
    data_dir: tfds data directory (for error messages).
    shuffle_buffer: encoded images in the training shuffle buffer.
  """

  def __init__(self, builder, tfds_split: str, info: data.DatasetInfo,
               num_examples: int, data_dir: Optional[str] = None,
               shuffle_buffer: int = SHUFFLE_BUFFER):
    self.builder = builder
    self.tfds_split = tfds_split
    self.info = info
    self.num_examples = num_examples
    self.data_dir = data_dir
    self.shuffle_buffer = shuffle_buffer

  def _records(self, training, seed, epoch, num_pipelines, input_context):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    read_config = tfds.ReadConfig(
        shuffle_seed=data.derived_seed(seed, epoch, data.SHUFFLE_TAG),
        input_context=input_context if num_pipelines > 1 else None)
    with tfds_source.quiet_tfds():
      return data.read_tfds(
          self.builder, ARCHIVES, self.data_dir, split=self.tfds_split,
          as_supervised=True, shuffle_files=training, read_config=read_config,
          decoders={"image": tfds.decode.SkipDecoding()})

  def dataset(self, *, batch_size: int, training: bool, epoch: int = 0,
              seed: int = 0, augment: Optional[data.AugmentConfig] = None,
              skip_batches: int = 0,
              input_context: Optional[tf.distribute.InputContext] = None,
              drop_remainder: Optional[bool] = None) -> tf.data.Dataset:
    """One epoch; arguments as in ``tfnas.data.make_dataset``.

    ``augment.pad_crop`` must be 0: training crops are random-resized crops.
    """
    augment, drop_remainder = data.check_pipeline_args(
        batch_size=batch_size, epoch=epoch, seed=seed,
        skip_batches=skip_batches, augment=augment, training=training,
        drop_remainder=drop_remainder)
    if training and augment.pad_crop:
      raise data.DataError(
          f"pad_crop={augment.pad_crop} does not apply to {self.info.name} "
          "(training images get a random-resized crop); use --pad_crop=0.")
    num_pipelines, _, per_replica, replicas_per_pipeline = (
        data.pipeline_layout(batch_size, input_context))
    pipeline_batch = per_replica * replicas_per_pipeline
    size, info = self.info.image_size, self.info
    ds = self._records(training, seed, epoch, num_pipelines, input_context)
    if training:
      keys = {tag: tf.constant(data.derived_seed(seed, epoch, tag), tf.int64)
              for tag in (data.CROP_TAG, data.FLIP_TAG, data.CUTOUT_TAG)}

      def prepare(index, record):
        encoded, label = record
        image = random_resized_crop(
            encoded, size, tf.stack([keys[data.CROP_TAG], index]))
        if augment.flip:
          image = tf.image.stateless_random_flip_left_right(
              image, seed=tf.stack([keys[data.FLIP_TAG], index]))
        image = data.normalize(image, info)
        if augment.cutout:
          image = data.cutout(image, augment.cutout,
                              tf.stack([keys[data.CUTOUT_TAG], index]))
        return image, tf.cast(label, tf.int32)

      ds = ds.shuffle(self.shuffle_buffer,
                      seed=data.derived_seed(seed, epoch, data.SHUFFLE_TAG),
                      reshuffle_each_iteration=False)
      # Repeat: a worker whose file shard is short still fills its steps.
      ds = ds.repeat().enumerate().skip(skip_batches * pipeline_batch)
    else:
      def prepare(unused_index, record):
        encoded, label = record
        image = data.normalize(center_crop(encoded, size), info)
        return image, tf.cast(label, tf.int32)

      ds = ds.enumerate()
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
    ds = ds.batch(pipeline_batch, drop_remainder=drop_remainder)
    if replicas_per_pipeline > 1:
      ds = ds.rebatch(per_replica, drop_remainder=drop_remainder)
    return ds.prefetch(tf.data.AUTOTUNE)


def open_imagenet(split: str, record_range, *, data_dir: Optional[str],
                  manual_dir: Optional[str], allow_download: bool,
                  info: data.DatasetInfo = INFO) -> TfdsStreamSplit:
  """The ``opener`` of the ``imagenet2012`` registry entry.

  Checks at once that the data is there (``tfnas.data.DataError`` naming
  ``--data_dir``/``--manual_dir`` otherwise) without reading any example.
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  with tfds_source.quiet_tfds():
    builder = data.prepared_tfds_builder(
        TFDS_NAME, ARCHIVES, data_dir=data_dir, manual_dir=manual_dir,
        allow_download=allow_download)
    tfds_split = TFDS_SPLITS[split]
    if record_range is not None:
      tfds_split = f"{tfds_split}[{record_range[0]}:{record_range[1]}]"
    records = data.read_tfds(builder, ARCHIVES, data_dir, split=tfds_split,
                             decoders={"image": tfds.decode.SkipDecoding()})
    try:
      num_examples = builder.info.splits[tfds_split].num_examples
    except KeyError:
      # No recorded split sizes (tfds.testing.mock_data); a prepared
      # dataset always has them. Count the records (undecoded).
      num_examples = int(records.reduce(0, lambda n, _: n + 1))
  if not num_examples:
    raise data.DataError(
        f"split {tfds_split!r} of {TFDS_NAME} in "
        f"{tfds_source.tfds_location(data_dir)} has no examples; re-prepare "
        "the dataset.")
  return TfdsStreamSplit(builder, tfds_split, info, num_examples,
                         data_dir=data_dir)


data.register_dataset(data.DatasetEntry(
    info=INFO, loader=None, opener=open_imagenet,
    augment=data.AugmentConfig(flip=True)))


def register_small_imagenet(name: str, image_size: int, *,
                            overwrite: bool = False) -> data.DatasetInfo:
  """Registers ``imagenet2012`` under another name at another input size
  (e.g. 32 for quick experiments and tests); same files, same recipe."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  info = dataclasses.replace(INFO, name=name, image_size=image_size)
  data.register_dataset(data.DatasetEntry(
      info=info, loader=None,
      opener=functools.partial(open_imagenet, info=info),
      augment=data.AugmentConfig(flip=True)), overwrite=overwrite)
  return info
