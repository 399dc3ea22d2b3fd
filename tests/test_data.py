"""Tests for tfnas.data: datasets, search split and tf.data pipelines."""

import dataclasses
import time

import numpy as np
import pytest
import tensorflow as tf

from tfnas import data
from tfnas.distribute import mirrored_strategy


def _batches(ds):
    return [(x.numpy(), y.numpy()) for x, y in ds]


def _digits_train():
    return data.load_split("digits", "train")


# --------------------------------------------------------------------------
# Sources


def test_digits_shapes_and_split():
    info = data.dataset_info("digits")
    assert info.input_shape == (8, 8, 1)
    assert info.num_classes == 10
    x_tr, y_tr = data.load_split("digits", "train")
    x_te, y_te = data.load_split("digits", "test")
    assert x_tr.shape == (info.num_train, 8, 8, 1) == (1497, 8, 8, 1)
    assert x_te.shape == (info.num_test, 8, 8, 1) == (300, 8, 8, 1)
    assert y_tr.dtype == np.int64 and y_tr.shape == (1497,)
    assert set(np.unique(y_tr)) == set(range(10))
    assert 0.0 <= x_tr.min() and x_tr.max() <= 255.0 and x_tr.max() > 200
    # Together the two splits are exactly the 1797 sklearn digits.
    from sklearn.datasets import load_digits
    digits = load_digits()
    assert np.bincount(np.concatenate([y_tr, y_te])).tolist() == \
        np.bincount(digits.target).tolist()
    np.testing.assert_allclose(
        np.sort(np.concatenate([x_tr, x_te]).sum(axis=(1, 2, 3))),
        np.sort(digits.images.sum(axis=(1, 2)) * 255.0 / 16.0), rtol=1e-5)
    # The published range, recorded for exports' metadata.json.
    assert digits.images.max() == info.source_pixel_max == 16.0
    with pytest.raises(data.DataError, match="source_pixel_max"):
        dataclasses.replace(info, source_pixel_max=0.0)


def test_digits_deterministic():
    x1, y1 = data.load_split("digits", "train")
    x2, y2 = data.load_split("digits", "train")
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)


def test_digits_normalised_train_set_statistics():
    x, y = _digits_train()
    info = data.dataset_info("digits")
    ds = data.make_dataset(x, y, info, batch_size=500, training=False)
    images = np.concatenate([b[0] for b in _batches(ds)])
    assert images.shape == x.shape and images.dtype == np.float32
    assert abs(images.mean()) < 1e-3
    assert abs(images.std() - 1.0) < 1e-3


def test_synthetic_shapes_deterministic_and_learnable():
    info = data.dataset_info("synthetic")
    x, y = data.load_split("synthetic", "train")
    x_te, y_te = data.load_split("synthetic", "test")
    assert x.shape == (256, 8, 8, 3) and x.dtype == np.uint8
    assert x_te.shape == (64, 8, 8, 3) and info.num_classes == 10
    x2, y2 = data.load_split("synthetic", "train")
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    # Nearest class mean beats chance by far.
    means = np.stack([x[y == c].mean(0) for c in range(10)]).reshape(10, -1)
    dist = ((x_te.reshape(64, 1, -1) - means[None]) ** 2).sum(-1)
    assert (dist.argmin(1) == y_te).mean() > 0.5
    custom_x, _ = data.synthetic_data("test", image_size=4, channels=1,
                                      num_classes=3, num_test=7)
    assert custom_x.shape == (7, 4, 4, 1)


def test_unknown_dataset_lists_known_names():
    with pytest.raises(data.DataError) as err:
        data.load_split("imagenet", "train")
    for name in ("digits", "synthetic", "cifar10", "cifar100", "svhn_cropped"):
        assert name in str(err.value)
    with pytest.raises(data.DataError, match="digits"):
        data.dataset_info("nope")
    with pytest.raises(data.DataError, match="train"):
        data.load_split("digits", "validation")


# --------------------------------------------------------------------------
# Search split


def test_search_splits_disjoint_and_sized():
    first, rest = data.split_indices(1497, 0.5)
    assert len(first) == 748 and len(rest) == 749
    assert not set(first) & set(rest)
    assert len(set(first) | set(rest)) == 1497
    (xa, ya), (xb, yb) = data.search_splits("digits", 0.7)
    assert len(ya) == int(np.floor(0.7 * 1497)) and len(ya) + len(yb) == 1497
    x, _ = _digits_train()
    first, rest = data.split_indices(1497, 0.7)
    np.testing.assert_array_equal(xa, x[first])
    np.testing.assert_array_equal(xb, x[rest])
    (xa2, _), _ = data.search_splits("digits", 0.7)
    np.testing.assert_array_equal(xa, xa2)


@pytest.mark.parametrize("portion", [0.0, 1.0, -0.1, 1.5])
def test_search_splits_bad_portion(portion):
    with pytest.raises(data.DataError, match="train_portion"):
        data.search_splits("digits", portion)


# --------------------------------------------------------------------------
# Training pipeline


def _train_ds(**kwargs):
    x, y = _digits_train()
    args = dict(batch_size=64, training=True, epoch=0, seed=3,
                augment=data.AugmentConfig(pad_crop=1, flip=True, cutout=3))
    args.update(kwargs)
    return data.make_dataset(x, y, data.dataset_info("digits"), **args)


def test_training_same_seed_epoch_identical():
    a, b = _batches(_train_ds()), _batches(_train_ds())
    assert len(a) == data.steps_per_epoch(1497, 64) == 23
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.shape == (64, 8, 8, 1) and ya.dtype == np.int32
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_training_different_epoch_or_seed_differs():
    base = _batches(_train_ds(epoch=0))[0]
    for other in (_batches(_train_ds(epoch=1))[0],
                  _batches(_train_ds(seed=4))[0]):
        assert not np.array_equal(base[0], other[0])
        assert not np.array_equal(base[1], other[1])


def test_skip_batches_is_tail_of_epoch():
    full = _batches(_train_ds())
    tail = _batches(_train_ds(skip_batches=20))
    assert len(tail) == len(full) - 20
    for (xa, ya), (xb, yb) in zip(full[20:], tail):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_evaluation_in_order_without_augmentation():
    x, y = data.load_split("digits", "test")
    info = data.dataset_info("digits")
    ds = data.make_dataset(x, y, info, batch_size=64, training=False,
                           augment=data.AugmentConfig(cutout=4))
    batches = _batches(ds)
    assert [len(b[1]) for b in batches] == [64, 64, 64, 64, 44]
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)
    expected = (x / 255.0 - info.mean[0]) / info.std[0]
    np.testing.assert_allclose(np.concatenate([b[0] for b in batches]),
                               expected, atol=1e-5)
    assert data.steps_per_epoch(300, 64, drop_remainder=False) == 5


@pytest.mark.parametrize("augment", [
    data.AugmentConfig(pad_crop=2), data.AugmentConfig(flip=True),
    data.AugmentConfig(cutout=3)])
def test_each_augmentation_changes_images(augment):
    plain = _batches(_train_ds(augment=data.AugmentConfig()))
    aug = _batches(_train_ds(augment=augment))
    # Same order (shuffle does not depend on augmentation) ...
    np.testing.assert_array_equal(plain[0][1], aug[0][1])
    assert aug[0][0].shape == plain[0][0].shape == (64, 8, 8, 1)
    # ... but (some) images differ.
    assert not np.array_equal(plain[0][0], aug[0][0])


def test_pad_crop_shifts_both_ways_by_at_most_pad():
  x = np.zeros((64, 8, 8, 1), np.uint8)
  x[:, 3:5, 3:5] = 255  # A centred bright square.
  info = data.dataset_info("digits")
  (images, _), = data.make_dataset(x, np.zeros(64, np.int64), info,
                                   batch_size=64, training=True, seed=1,
                                   augment=data.AugmentConfig(pad_crop=2))
  shifts = set()
  for image in images.numpy():
    rows, cols = np.nonzero(image[..., 0] > 0)
    shifts.add((rows.min() - 3, cols.min() - 3))
  assert {s[0] for s in shifts} == {s[1] for s in shifts} == {
      -2, -1, 0, 1, 2}


def test_cutout_zeros_a_square():
    x, y = data.load_split("synthetic", "train")
    info = data.dataset_info("synthetic")
    ds = data.make_dataset(x, y, info, batch_size=256, training=True,
                           seed=0, augment=data.AugmentConfig(cutout=3))
    plain = data.make_dataset(x, y, info, batch_size=256, training=True,
                              seed=0)
    (images, _), = _batches(ds)
    (reference, _), = _batches(plain)
    for image, ref in zip(images, reference):
        changed = np.any(image != ref, axis=-1)
        assert np.all(image[changed] == 0.0)
        rows, cols = np.nonzero(changed)
        assert 1 <= changed.sum() <= 9
        # The changed pixels fill their bounding box: a (clipped) square.
        height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert changed.sum() == height * width
        assert height <= 3 and width <= 3


def test_cutout_centre_covers_every_pixel():
    # A 1-pixel cutout lands anywhere, the last row and column included
    # (centres drawn from [0, size), as in DARTS' code).
    from tfnas.data.pipeline import cutout
    image = tf.ones([4, 4, 1])
    hits = np.zeros((4, 4))
    for i in range(200):
        hits += (cutout(image, 1, tf.constant([7, i], tf.int64))[..., 0]
                 .numpy() == 0)
    assert hits.sum() == 200 and np.all(hits > 0)


def test_make_dataset_rejects_bad_arguments():
    x, y = _digits_train()
    info = data.dataset_info("digits")
    with pytest.raises(data.DataError, match="batch_size"):
        data.make_dataset(x, y, info, batch_size=0, training=True)
    with pytest.raises(data.DataError, match="batch_size"):
        data.make_dataset(x[:10], y[:10], info, batch_size=64, training=True)
    with pytest.raises(data.DataError, match="shape"):
        data.make_dataset(x, y, data.dataset_info("synthetic"),
                          batch_size=8, training=True)
    with pytest.raises(data.DataError, match="pad_crop"):
        data.AugmentConfig(pad_crop=-1)


# --------------------------------------------------------------------------
# Distribution


def test_mirrored_replica_batches_concatenate_to_global_batch():
    x, y = _digits_train()
    info = data.dataset_info("digits")
    kwargs = dict(batch_size=64, training=True, epoch=2, seed=5,
                  augment=data.AugmentConfig(pad_crop=1, flip=True, cutout=2))
    expected = _batches(data.make_dataset(x, y, info, skip_batches=1,
                                          **kwargs))
    strategy = mirrored_strategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    dist = data.distributed_dataset(
        strategy, lambda ctx: data.make_dataset(
            x, y, info, skip_batches=1, input_context=ctx, **kwargs))
    steps = 0
    for (xs, ys), (ex, ey) in zip(dist, expected):
        x_parts = strategy.experimental_local_results(xs)
        y_parts = strategy.experimental_local_results(ys)
        assert len(x_parts) == 2 and x_parts[0].shape == (32, 8, 8, 1)
        np.testing.assert_array_equal(np.concatenate(x_parts), ex)
        np.testing.assert_array_equal(np.concatenate(y_parts), ey)
        steps += 1
    assert steps == len(expected) == 22


def test_multi_pipeline_shards_are_disjoint():
    x, y = _digits_train()
    info = data.dataset_info("digits")
    seen = []
    for pipeline in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2,
                                         input_pipeline_id=pipeline,
                                         num_replicas_in_sync=2)
        # Labels of an identity dataset reveal the example indices.
        batches = _batches(data.make_dataset(
            x, np.arange(len(y)) % 10, info, batch_size=64, training=True,
            input_context=ctx))
        assert len(batches) == data.steps_per_epoch(1497, 64)
        assert batches[0][0].shape == (32, 8, 8, 1)
        seen.append(batches)
    assert not any(np.array_equal(a[0], b[0])
                   for a, b in zip(seen[0], seen[1]))


# --------------------------------------------------------------------------
# tensorflow_datasets


@pytest.mark.parametrize("name", ["cifar10", "svhn_cropped"])
def test_tfds_mock_data(name, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    info = data.dataset_info(name)
    with tfds.testing.mock_data(num_examples=20):
        x, y = data.load_split(name, "train", data_dir=str(tmp_path))
    assert x.shape == (20, 32, 32, 3) and x.dtype == np.uint8
    assert y.shape == (20,) and y.min() >= 0 and y.max() < info.num_classes
    ds = data.make_dataset(x, y, info, batch_size=8, training=True,
                           augment=data.default_augment(name, cutout=8))
    batches = _batches(ds)
    assert len(batches) == 2
    assert batches[0][0].shape == (8, 32, 32, 3)
    assert batches[0][1].shape == (8,)


def test_tfds_not_prepared_fails_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(data.DataError) as err:
        data.load_split("cifar10", "train", data_dir=str(tmp_path))
    assert time.monotonic() - start < 5.0
    message = str(err.value)
    assert "--data_dir" in message and "cifar10" in message
    assert "cifar-10-binary.tar.gz" in message


def test_tfds_empty_version_folder_is_one_clear_error(tmp_path):
    # What an interrupted preparation or a partial copy leaves: tfds takes
    # the folder for prepared data and found no splits (a KeyError before).
    import tensorflow_datasets as tfds
    version = str(tfds.builder("cifar10", data_dir=str(tmp_path)).version)
    folder = tmp_path / "cifar10" / version
    folder.mkdir(parents=True)
    with pytest.raises(data.DataError) as err:
        data.load_split("cifar10", "train", data_dir=str(tmp_path))
    message = str(err.value)
    assert f"{folder} holds no prepared splits" in message
    assert "cifar-10-binary.tar.gz" in message and "--data_dir" in message


@pytest.mark.parametrize("info", ["{}", "junk"])
def test_tfds_damaged_dataset_info_is_one_clear_error(tmp_path, info):
  # tfds raised an AssertionError (proto versions) or a protobuf ParseError
  # while constructing the builder: a traceback before.
  import tensorflow_datasets as tfds
  version = str(tfds.builder("cifar10", data_dir=str(tmp_path)).version)
  folder = tmp_path / "cifar10" / version
  folder.mkdir(parents=True)
  (folder / "dataset_info.json").write_text(info)
  with pytest.raises(data.DataError) as err:
    data.load_split("cifar10", "train", data_dir=str(tmp_path))
  message = str(err.value)
  assert message.startswith(f"dataset 'cifar10' in {tmp_path} cannot be "
                            "read (")
  assert "dataset_info.json is damaged" in message
  assert "cifar-10-binary.tar.gz" in message and "--data_dir" in message
  assert "\n" not in message


def test_tfds_manual_dir_without_archive_fails_fast(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    start = time.monotonic()
    with pytest.raises(data.DataError, match="cifar-100-binary.tar.gz"):
        data.load_split("cifar100", "test", data_dir=str(tmp_path / "data"),
                        manual_dir=str(manual))
    assert time.monotonic() - start < 5.0


def test_tfds_manual_dir_with_a_bad_archive_is_one_clear_error(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "cifar-10-binary.tar.gz").write_bytes(b"not an archive\n")
    with pytest.raises(data.DataError,
                       match=r"preparing dataset 'cifar10' .* from the "
                             r"archives in --manual_dir .* failed \(.*\); "
                             r"check that cifar-10-binary.tar.gz is the "
                             r"original"):
        data.load_split("cifar10", "train", data_dir=str(tmp_path / "data"),
                        manual_dir=str(manual))


def test_multi_pipeline_shards_have_the_same_number_of_batches():
  # Shards of 64 and 63 examples: each worker runs the same number of
  # steps, or their collectives would wait for each other forever.
  x, y = data.load_split("digits", "train")
  x, y = x[:127], y[:127]
  counts = []
  for pipeline in range(2):
    ctx = tf.distribute.InputContext(num_input_pipelines=2,
                                     input_pipeline_id=pipeline,
                                     num_replicas_in_sync=2)
    counts.append(sum(1 for _ in data.make_dataset(
        x, y, data.dataset_info("digits"), batch_size=64, training=True,
        input_context=ctx)))
  assert counts == [data.steps_per_epoch(127, 64)] * 2 == [1, 1]


def test_dataset_info_refuses_a_zero_std():
  from tfnas.data.registry import DataError, DatasetInfo
  with pytest.raises(DataError, match="must be positive"):
    DatasetInfo(name="flat", image_size=8, channels=1, num_classes=2,
                mean=(0.5,), std=(0.0,), num_train=1, num_test=1)


def test_augmentation_that_can_erase_an_image_is_refused():
  # The CIFAR recipe's cutout 16 covers all of every 8x8 digit (from
  # 2*8 - 1 on); as wide as the image it covers some images whole.
  for augment, flag in ((data.AugmentConfig(cutout=16), "--cutout=16"),
                        (data.AugmentConfig(cutout=8), "--cutout=8"),
                        (data.AugmentConfig(pad_crop=8), "--pad_crop=8")):
    with pytest.raises(data.DataError, match=rf"{flag} is not smaller than "
                       r"the 8x8 images of digits: .*at most 4 .*train_digits"):
      augment.check_fits(8, "digits")
  # Large for the image: a warning each.
  warnings = data.AugmentConfig(cutout=5, pad_crop=2).check_fits(8, "digits")
  assert [w.split(" ")[0] for w in warnings] == ["--cutout=5", "--pad_crop=2"]
  # The CIFAR-10 recipe on 32x32 and the digits recipe on 8x8 pass quietly.
  assert not data.AugmentConfig(cutout=16, pad_crop=4,
                                flip=True).check_fits(32, "cifar10")
  assert not data.AugmentConfig(cutout=4, pad_crop=1).check_fits(8, "digits")
