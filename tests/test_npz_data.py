"""A user's own images: `--dataset=npz:PATH` and tools/images_to_npz.py."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tfnas import data
from tfnas import dataset_names
from tfnas import flags as tfnas_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")


def _arrays(num_train=40, num_test=12, side=8, channels=3, classes=3,
            seed=0, dtype=np.uint8, high=255):
  rng = np.random.default_rng(seed)
  shape = (side, side, channels) if channels else (side, side)
  def images(n):
    values = rng.uniform(0, high, (n,) + shape)
    return values.astype(dtype) if dtype != np.uint8 else np.round(
        values).astype(np.uint8)
  return dict(x_train=images(num_train),
              y_train=np.arange(num_train) % classes,
              x_test=images(num_test), y_test=np.arange(num_test) % classes)


def _save(path, **arrays):
  np.savez(path, **arrays)
  return f"npz:{path}"


def test_uint8_images_are_read_as_they_are_and_measured(tmp_path):
  arrays = _arrays()
  name = _save(tmp_path / "mine.npz", **arrays,
               class_names=np.array(["cat", "dog", "owl"]))
  info = data.dataset_info(name)
  assert (info.image_size, info.channels, info.num_classes) == (8, 3, 3)
  assert (info.num_train, info.num_test) == (40, 12)
  scaled = arrays["x_train"].astype(np.float64) / 255
  np.testing.assert_allclose(info.mean, scaled.mean(axis=(0, 1, 2)),
                             rtol=1e-12)
  np.testing.assert_allclose(info.std, scaled.std(axis=(0, 1, 2)), rtol=1e-9)
  assert info.source_pixel_max == 255
  images, labels = data.load_split(name, "test")
  assert labels.dtype == np.int64
  # The same (image, label) pairs, shuffled once with a fixed seed.
  pairs = lambda x, y: sorted((a.tobytes(), int(b)) for a, b in zip(x, y))
  assert pairs(images, labels) == pairs(arrays["x_test"], arrays["y_test"])
  assert not np.array_equal(labels, arrays["y_test"])
  np.testing.assert_array_equal(data.load_split(name, "test")[1], labels)
  assert info.input_metadata()["class_names"] == ["cat", "dog", "owl"]
  assert "class_names" not in data.dataset_info("digits").input_metadata()


@pytest.mark.parametrize("dtype, high, pixel_max", [
    (np.float32, 1.0, None),  # Float images: 0-1.
    (np.uint16, 4000, 4095),  # 12-bit images with their pixel_max.
    (np.float64, 16.0, 16),   # scikit-learn's digits as published.
])
def test_other_ranges_are_scaled_to_0_255(tmp_path, dtype, high, pixel_max):
  arrays = _arrays(channels=0, dtype=dtype, high=high)  # (N, H, W): grey.
  arrays["y_train"] = arrays["y_train"][:, None]  # (N, 1) labels.
  extra = {} if pixel_max is None else {"pixel_max": np.array(pixel_max)}
  name = _save(tmp_path / "mine.npz", **arrays, **extra)
  images, labels = data.load_split(name, "train")
  scale = 255.0 / (pixel_max or 1.0)
  assert images.shape == (40, 8, 8, 1)
  order = np.random.default_rng([0, 0]).permutation(40)  # The read shuffle.
  np.testing.assert_allclose(images[..., 0],
                             arrays["x_train"][order].astype(np.float64) *
                             scale, rtol=1e-6)
  np.testing.assert_array_equal(labels, (np.arange(40) % 3)[order])
  info = data.dataset_info(name)
  assert info.source_pixel_max == (pixel_max or 1.0)
  np.testing.assert_allclose(info.mean, [images.mean() / 255], rtol=1e-6)


def test_a_relative_name_means_its_absolute_file_and_a_new_file_is_reread(
    tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  _save("mine.npz", **_arrays(classes=3))
  info = data.dataset_info("npz:mine.npz")
  assert info.name == f"npz:{tmp_path}/mine.npz"
  saved = tfnas_flags.dataset_name("npz:mine.npz")
  assert saved == (f"npz:{tmp_path}/mine.npz#sha256:"
                   f"{dataset_names.file_fingerprint('mine.npz')}")
  assert data.dataset_info(saved).name == saved
  assert info.num_classes == 3
  _save("mine.npz", **_arrays(classes=5, num_train=45))
  os.utime("mine.npz", ns=(1, 1))  # A different version, whatever the clock.
  assert data.dataset_info("npz:mine.npz").num_classes == 5
  assert "npz:mine.npz" not in data.DATASETS  # Resolved, not registered.
  # The name a run saved refuses the file's new content, and a lost file.
  with pytest.raises(data.DataError, match="changed since the run read it"):
    data.dataset_info(saved)
  os.rename("mine.npz", "moved.npz")
  with pytest.raises(data.DataError, match="does not exist .put the file "
                     "the run read back there; a --resume may name it at "
                     "another path.$"):
    data.dataset_info(saved)


def _bad(arrays, **changes):
  arrays = dict(arrays, **changes)
  return {k: v for k, v in arrays.items() if v is not None}


GOOD = _arrays()


@pytest.mark.parametrize("arrays, fragment", [
    (_bad(GOOD, x_test=None, y_test=None, X_test=GOOD["x_test"]),
     "has no x_test, y_test (it holds X_test, x_train, y_train)"),
    (_bad(GOOD, x_train=GOOD["x_train"][:, :, :6]),
     "x_train images are 8x6; tfnas searches square images"),
    (_bad(GOOD, x_test=GOOD["x_test"][:, :4, :4]),
     "x_train images are 8x8x3 but x_test images 4x4x3"),
    (_bad(GOOD, y_train=GOOD["y_train"][:-1]),
     "x_train holds 40 images but y_train 39 labels"),
    (_bad(GOOD, y_test=GOOD["y_test"] - 1), "negative label -1"),
    (_bad(GOOD, y_train=GOOD["y_train"].astype(np.float32)),
     "labels are integer class indices"),
    (_bad(GOOD, y_train=np.eye(3)[GOOD["y_train"]].astype(np.int64)),
     "one-hot labels: store y.argmax(axis=1)"),
    (_bad(GOOD, x_train=GOOD["x_train"].astype(np.float32),
          x_test=GOOD["x_test"].astype(np.float32)),
     "x_train values reach 255, above 1; float images are read as 0-1"),
    (_bad(GOOD, x_train=GOOD["x_train"].astype(np.float32)),
     "x_train has dtype float32 but x_test uint8"),
    (_bad(GOOD, x_train=GOOD["x_train"] / 127.5 - 1,
          x_test=GOOD["x_test"] / 127.5 - 1), "(x + 1) / 2 for -1..1 floats"),
    (_bad(GOOD, x_train=np.transpose(GOOD["x_train"], (0, 3, 1, 2))),
     "channels first; tfnas reads (N, H, W, C)"),
    (_bad(GOOD, y_train=GOOD["y_train"] * 1000, y_test=GOOD["y_test"] * 1000),
     "the labels use 3 distinct values up to 2000"),
    (_bad(GOOD, y_train=GOOD["y_train"].astype(np.uint64) + 2**63),
     "renumber them with np.unique"),
    (_bad(GOOD, class_names=np.array(["cat", "cat", "owl"])),
     "class_names must be distinct and not empty"),
    (_bad(GOOD, class_names=np.array([b"\xff", b"dog", b"owl"])),
     "not UTF-8"),
    (_bad(GOOD, pixel_max=np.array(1 + 2j)), "pixel_max must be one"),
    (_bad(GOOD, x_train=GOOD["x_train"].astype(np.int32) * 4),
     "add the largest possible value as pixel_max"),
    (_bad(GOOD, pixel_max=np.array([255, 255])), "pixel_max must be one"),
    (_bad(GOOD, x_train=GOOD["x_train"] / 255.0,
          x_test=np.full((12, 8, 8, 3), np.nan)), "NaN or infinite"),
    (_bad(GOOD, y_train=np.zeros(40, np.int64), y_test=np.zeros(12, np.int64)),
     "at least two classes"),
    (_bad(GOOD, class_names=np.array(["cat", "dog"])),
     "2 class_names for labels up to 2"),
    (_bad(GOOD, x_train=np.full((40, 8, 8, 3), 7, np.uint8)),
     "channel 0 of x_train has the same value in every pixel"),
    (_bad(GOOD, x_train=np.zeros((0, 8, 8, 3), np.uint8),
          y_train=np.zeros(0, np.int64)), "with N > 0 images"),
])
def test_a_bad_file_is_one_error_naming_the_problem(tmp_path, arrays,
                                                    fragment):
  name = _save(tmp_path / "bad.npz", **arrays)
  with pytest.raises(data.DataError) as error:
    data.dataset_info(name)
  assert fragment in str(error.value)
  assert str(tmp_path / "bad.npz") in str(error.value)


def _npy(path):
  with open(path, "wb") as f:
    np.save(f, np.zeros(3))


@pytest.mark.parametrize("write, fragment", [
    (_npy, "holds one array (.npy)"),
    (lambda p: p.write_text("hello"), "is not a NumPy .npz file"),
    (lambda p: np.savez(p, **_bad(GOOD, x_train=np.array([{}], object))),
     "pickled Python objects"),
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: None, "does not exist"),
])
def test_files_that_are_not_npz_datasets(tmp_path, write, fragment):
  path = tmp_path / "data.npz"
  write(path)
  with pytest.raises(data.DataError) as error:
    data.dataset_info(f"npz:{path}")
  assert fragment in str(error.value), str(error.value)


def test_unknown_names_offer_npz():
  with pytest.raises(data.DataError, match="or npz:PATH"):
    data.dataset_info("mnist")


def _run(args, cwd, timeout=300):
  return subprocess.run([sys.executable, *args], cwd=cwd, env=ENV,
                        capture_output=True, text=True, timeout=timeout)


def _needs_its_file(run_dir, path, state):
  """tfnas-export's refusal of a run without dataset.json whose data file
  is not as the run read it."""
  return (f"{run_dir} keeps no dataset.json (written before runs kept one), "
          f"so its export reads the run's data file, but its data file "
          f"{path} {state}; put back the file the run used, or name where it "
          "is now with --dataset=npz:PATH")


@pytest.mark.slow
def test_search_export_on_a_relative_npz_file(tmp_path):
  """From a working directory holding the file: the run saves its absolute
  path, and the export (from elsewhere) finds the data and names the
  classes."""
  names = np.array(["zero", "one", "two"])
  _save(tmp_path / "mine.npz", **_arrays(num_train=64, num_test=16),
        class_names=names)
  search = _run(
      ["-m", "tfnas.apps.search", "--method=dsnas", "--space=shufflenet_small",
       "--dataset=npz:mine.npz", "--run_dir=run", "--epochs=1", "--pad_crop=1",
       "--max_steps_per_epoch=2", "--batch_size=16", "--stage_repeats=1,1",
       "--stage_channels=8,16", "--stem_channels=4", "--head_channels=16",
       "--noprogress"], cwd=tmp_path)
  assert search.returncode == 0, search.stderr[-3000:]
  config = json.loads((tmp_path / "run" / "config.json").read_text())
  assert config["dataset"] == (
      f"npz:{tmp_path}/mine.npz#sha256:"
      f"{dataset_names.file_fingerprint(tmp_path / 'mine.npz')}")
  export = _run(["-m", "tfnas.apps.export", f"--run_dir={tmp_path}/run",
                 f"--export_dir={tmp_path}/exported"], cwd=ROOT)
  assert export.returncode == 0, export.stderr[-3000:]
  metadata = json.loads(
      (tmp_path / "exported" / "1" / "metadata.json").read_text())
  assert metadata["class_names"] == names.tolist()
  assert metadata["input_shape"] == [8, 8, 3]
  assert metadata["dataset"] == config["dataset"]
  assert "val_acc" in metadata
  # The run directory without its data file (copied elsewhere): the export
  # reads the run's dataset.json, and only the measurement is left out;
  # re-estimating BN statistics, which needs the images, is refused.
  (tmp_path / "mine.npz").rename(tmp_path / "moved.npz")
  recorded = json.loads((tmp_path / "run" / "dataset.json").read_text())
  assert recorded["name"] == config["dataset"]
  assert recorded["class_names"] == names.tolist()
  refused = _run(["-m", "tfnas.apps.export", f"--run_dir={tmp_path}/run",
                  f"--export_dir={tmp_path}/exported",
                  "--recalibrate_batches=2"], cwd=ROOT)
  assert refused.returncode == 2, refused.stderr[-3000:]
  assert (f"its data file {tmp_path}/mine.npz is not there" in
          refused.stderr.splitlines()[-1])
  again = _run(["-m", "tfnas.apps.export", f"--run_dir={tmp_path}/run",
                f"--export_dir={tmp_path}/unmeasured"], cwd=ROOT)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "exported without measuring it" in again.stderr
  asked = _run(["-m", "tfnas.apps.export", f"--run_dir={tmp_path}/run",
                f"--export_dir={tmp_path}/asked", "--evaluate"], cwd=ROOT)
  assert asked.returncode == 2, asked.stderr[-3000:]  # Asked for by name.
  assert "--evaluate measures the child on the search's data" in asked.stderr
  assert not (tmp_path / "asked").exists()
  unmeasured = json.loads(
      (tmp_path / "unmeasured" / "1" / "metadata.json").read_text())
  assert "val_acc" not in unmeasured
  assert unmeasured["val_unmeasured"] == (
      f"{tmp_path}/mine.npz is not there at export")
  assert ("deployed child not measured: "
          f"{tmp_path}/mine.npz is not there at export") in again.stdout
  assert "val_unmeasured" not in metadata
  for key in ("class_names", "input_shape", "mean", "std", "dataset",
              "source_pixel_max"):
    assert unmeasured[key] == metadata[key], key
  # Other images at the data file's path are not measured on; --noevaluate
  # exports from dataset.json, and --dataset names the file's new place.
  _save(tmp_path / "mine.npz", **_arrays(num_train=64, num_test=16, seed=5))
  export = lambda where, *more: _run(
      ["-m", "tfnas.apps.export", f"--run_dir={tmp_path}/run",
       f"--export_dir={tmp_path}/{where}", *more], cwd=ROOT)
  changed = export("changed")
  assert changed.returncode == 2, changed.stderr[-3000:]
  assert changed.stderr.splitlines()[-1].endswith(
      f"its data file {tmp_path}/mine.npz changed since the run read it; "
      "put back the file the run used, or name where it is now with "
      "--dataset=npz:PATH, or export with --noevaluate")
  assert not (tmp_path / "changed").exists()
  assert export("changed", "--noevaluate").returncode == 0
  assert json.loads((tmp_path / "changed" / "1" / "metadata.json").read_text(
  ))["val_unmeasured"] == "exported with --noevaluate"
  other = export("other", f"--dataset=npz:{tmp_path}/mine.npz")
  assert other.returncode == 2
  assert "holds other data than the run's" in other.stderr
  missing = export("other", "--dataset=npz:mine.npz")  # Not in ROOT.
  assert missing.stderr.splitlines()[-1].endswith(
      f"--dataset=npz:mine.npz: {ROOT}/mine.npz is not a file")
  measured = export("measured", f"--dataset=npz:{tmp_path}/moved.npz",
                    "--recalibrate_batches=1")
  assert measured.returncode == 0, measured.stderr[-3000:]
  recalibrated = json.loads(
      (tmp_path / "measured" / "1" / "metadata.json").read_text())
  assert recalibrated["bn_recalibration_batches"] == 1
  assert 0 <= recalibrated["val_acc"] <= 1
  # A run directory without dataset.json (written before runs kept one)
  # reads the file, and says so.
  (tmp_path / "run" / "dataset.json").unlink()
  old = export("old", "--noevaluate")
  assert old.returncode == 2
  assert old.stderr.splitlines()[-1].endswith(_needs_its_file(
      tmp_path / "run", tmp_path / "mine.npz", "changed since the run read it"))
  assert export("old", f"--dataset=npz:{tmp_path}/moved.npz").returncode == 0


def test_a_bad_npz_file_stops_the_search_before_its_run_directory(tmp_path):
  name = _save(tmp_path / "bad.npz",
               **_bad(GOOD, x_train=GOOD["x_train"][:, :, :6]))
  proc = _run(["-m", "tfnas.apps.search",
               f"--flagfile={ROOT}/flags/darts_digits.cfg", f"--dataset={name}",
               f"--run_dir={tmp_path}/run"], cwd=ROOT)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert lines[-1].startswith("tfnas-search: error: "), proc.stderr[-2000:]
  assert "square images" in lines[-1]
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "run").exists()


def _bmp(image):
  """A 24-bit BMP file of an RGB uint8 image (TensorFlow decodes but does
  not encode BMP)."""
  import struct
  height, width, _ = image.shape
  row = (width * 3 + 3) // 4 * 4
  pixels = b"".join(line[:, ::-1].tobytes() + b"\0" * (row - width * 3)
                    for line in image[::-1])
  return (b"BM" + struct.pack("<IHHI", 54 + len(pixels), 0, 0, 54) +
          struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0,
                      len(pixels), 2835, 2835, 0, 0) + pixels)


def _image_folder(root, sizes):
  """Two classes of PNG, JPEG and BMP images, plus files to skip: a text
  file, a hidden (AppleDouble) file and a hidden folder."""
  rng = np.random.default_rng(0)
  for c, name in enumerate(["b_dog", "a_cat"]):
    os.makedirs(root / name / ".ipynb_checkpoints")
    for i, (h, w) in enumerate(sizes):
      image = np.full((h, w, 3), 40 + 100 * c, np.uint8)
      image[..., 2] = rng.integers(0, 255, (h, w))
      if i == len(sizes) - 1:
        (root / name / f"{i}.bmp").write_bytes(_bmp(image))
        continue
      encode = tf.io.encode_png if i % 2 else tf.io.encode_jpeg
      (root / name / f"{i}.{'png' if i % 2 else 'jpg'}").write_bytes(
          encode(image).numpy())
    (root / name / "._0.jpg").write_bytes(b"AppleDouble")
    (root / name / ".ipynb_checkpoints" / "0.png").write_bytes(
        tf.io.encode_png(image).numpy())
  (root / "a_cat" / "notes.txt").write_text("not an image")


def test_images_to_npz_writes_a_file_the_search_reads(tmp_path):
  _image_folder(tmp_path / "photos", [(12, 20), (16, 16), (20, 12), (9, 9),
                                      (30, 14)])
  tool = os.path.join(ROOT, "tools", "images_to_npz.py")
  out = tmp_path / "photos.npz"
  mixed = _run([tool, f"--input_dir={tmp_path}/photos", f"--output={out}"],
               cwd=ROOT)
  assert mixed.returncode == 2, mixed.stderr[-2000:]
  assert "pass --size=N" in mixed.stderr
  assert not out.exists()
  proc = _run([tool, f"--input_dir={tmp_path}/photos", f"--output={out}",
               "--size=8", "--channels=1"], cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "8 train and 2 test images of 8x8x1, 2 classes (a_cat, b_dog)" in (
      proc.stdout)
  with np.load(out) as npz:
    assert npz["class_names"].tolist() == ["a_cat", "b_dog"]
    assert npz["x_train"].shape == (8, 8, 8, 1)
    assert npz["x_train"].dtype == np.uint8
    # Each class's grey level, from its own folder (a_cat is label 0).
    for split in ("train", "test"):
      x, y = npz[f"x_{split}"], npz[f"y_{split}"]
      for label, red in ((0, 140), (1, 40)):
        grey = x[y == label].astype(np.float64).mean(axis=(1, 2, 3))
        expected = 0.299 * red + 0.587 * red  # + 0.114 * noisy blue.
        assert np.all(np.abs(grey - expected - 0.114 * 127) < 25), grey
  info = data.dataset_info(f"npz:{out}")
  assert (info.image_size, info.channels, info.num_classes) == (8, 1, 2)
  again = _run([tool, f"--input_dir={tmp_path}/photos", f"--output={out}",
                "--size=8"], cwd=ROOT)
  assert again.returncode == 2 and "--overwrite" in again.stderr


_TRAIN_CONFIG = r"""
import sys
from tfnas import flags as tfnas_flags
import tfnas.apps.train  # Defines tfnas-train's flags.
tfnas_flags.FLAGS(["tfnas-train", "--genotype=DARTS_V2", *sys.argv[1:]])
print(tfnas_flags.train_config().dataset)
"""


def test_tfnas_train_saves_the_absolute_path_too(tmp_path):
  _save(tmp_path / "mine.npz", **GOOD)
  proc = _run(["-c", _TRAIN_CONFIG, "--dataset=npz:mine.npz"], cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == [
      f"npz:{tmp_path}/mine.npz#sha256:"
      f"{dataset_names.file_fingerprint(tmp_path / 'mine.npz')}"]
  missing = _run(["-c", _TRAIN_CONFIG, "--dataset=npz:other.npz"],
                 cwd=tmp_path)
  assert missing.returncode != 0
  assert f"{tmp_path}/other.npz is not a file" in missing.stderr


def test_unused_classes_are_warned_of_and_arrays_are_read_only(tmp_path,
                                                               caplog):
  arrays = _arrays(classes=3)
  arrays["y_train"] = np.where(arrays["y_train"] == 1, 0, arrays["y_train"])
  arrays["x_train"] = arrays["x_train"].astype(np.int64)  # 0-255 integers.
  name = _save(tmp_path / "gaps.npz", **arrays,
               class_names=np.array(["cat", "dog", "owl"]))
  images, labels = data.load_split(name, "train")
  assert "1 of 3 classes have no training image (dog)" in caplog.text
  assert "no test image" not in caplog.text  # Each trained class has some.
  assert images.dtype == np.uint8  # Not four times the memory as float32.
  with pytest.raises(ValueError):
    images[0, 0, 0, 0] = 1  # The cached split stays as read.
  # Ids of a few classes under class_names: their names say how many.
  arrays["y_test"] = arrays["y_test"] * 0
  name = _save(tmp_path / "named.npz", **_bad(arrays, y_train=np.arange(40) % 2),
               class_names=np.array([f"c{i}" for i in range(8)]))
  assert data.dataset_info(name).num_classes == 8


def test_a_zip_member_that_is_not_an_array(tmp_path):
  import zipfile
  path = tmp_path / "odd.npz"
  np.savez(path, **GOOD)
  with zipfile.ZipFile(path, "a") as z:
    z.writestr("pixel_max.npy", b"not an array")
  with pytest.raises(data.DataError, match="member pixel_max is not a NumPy"):
    data.dataset_info(f"npz:{path}")


def test_images_to_npz_reads_a_train_and_val_layout(tmp_path):
  for split in ("Train", "val"):
    _image_folder(tmp_path / "photos" / split, [(8, 8), (8, 8)])
  tool = os.path.join(ROOT, "tools", "images_to_npz.py")
  proc = _run([tool, f"--input_dir={tmp_path}/photos",
               f"--output={tmp_path}/photos.npz"], cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "4 train and 4 test images of 8x8x3, 2 classes (a_cat, b_dog)" in (
      proc.stdout)
  missing = _run([tool, f"--input_dir={tmp_path}/photos/Train",
                  f"--output={tmp_path}/none/x.npz"], cwd=ROOT)
  assert missing.returncode == 2
  assert f"the folder {tmp_path}/none does not exist" in missing.stderr
  # A class whose folder the test split lacks is trained on, unmeasured.
  shutil.rmtree(tmp_path / "photos" / "val" / "b_dog")
  untested = _run([tool, f"--input_dir={tmp_path}/photos",
                   f"--output={tmp_path}/photos.npz", "--overwrite"], cwd=ROOT)
  assert untested.returncode == 0, untested.stderr[-2000:]
  assert ("1 of 2 classes have no test image (b_dog); the accuracy measured "
          "on the test split leaves them out") in untested.stderr
  assert "4 train and 2 test images" in untested.stdout


def test_a_resume_or_a_copied_name_refuses_a_changed_file(tmp_path):
  from tfnas.config import ConfigError, SearchConfig
  from tfnas.train import rundir, search
  _save(tmp_path / "mine.npz", **GOOD)
  name = dataset_names.saved_name(f"npz:{tmp_path}/mine.npz")
  config = SearchConfig(run_dir=str(tmp_path / "run"), dataset=name)
  rundir.prepare(config.run_dir, config.to_dict(), False,
                 **search._RESUME_RULES)
  # Unchanged: resumable.
  rundir.resumable_config(config.run_dir, config.to_dict(),
                          **search._RESUME_RULES)
  _save(tmp_path / "mine.npz", **_arrays(seed=1))
  changed = dataset_names.saved_name(f"npz:{tmp_path}/mine.npz")
  again = SearchConfig(run_dir=config.run_dir, dataset=changed)
  with pytest.raises(data.DataError, match="changed since the run read it"):
    rundir.resumable_config(again.run_dir, again.to_dict(),
                            **search._RESUME_RULES)
  # A fingerprinted name copied from the run's config.json is checked, not
  # replaced by the new file's.
  with pytest.raises(ConfigError, match="changed since the run that saved"):
    tfnas_flags.dataset_name(name)
  assert tfnas_flags.dataset_name(changed) == changed


def test_a_resume_reads_the_same_content_from_a_new_path(tmp_path):
  """A run resumed with its data file moved (same content, another path)
  resumes and saves the new path, even where other content now lies at
  the old one; other data is refused by name, whatever its kind."""
  from tfnas.config import SearchConfig, TrainConfig
  from tfnas.train import retrain, rundir, search
  _save(tmp_path / "mine.npz", **GOOD)
  name = dataset_names.saved_name(f"npz:{tmp_path}/mine.npz")
  runs = [(lambda d, run="search": SearchConfig(
               run_dir=str(tmp_path / run), dataset=d), search._RESUME_RULES),
          (lambda d, run="train": TrainConfig(
               run_dir=str(tmp_path / run), dataset=d, genotype="DARTS_V2"),
           retrain._RESUME_RULES)]
  for config, rules in runs:
    rundir.prepare(config(name).run_dir, config(name).to_dict(), False,
                   **rules)
  (tmp_path / "mine.npz").rename(tmp_path / "moved.npz")
  moved = dataset_names.saved_name(f"npz:{tmp_path}/moved.npz")
  _save(tmp_path / "mine.npz", **_arrays(seed=1))  # Other data, old path.
  other = dataset_names.saved_name(f"npz:{tmp_path}/mine.npz")
  for config, rules in runs:
    run_dir = config(name).run_dir
    with pytest.raises(data.DataError, match=(
        f"^this run was on --dataset=npz:{tmp_path}/mine.npz \\(content "
        f"sha256 {dataset_names.split_name(name)[1]}...\\), which changed "
        f"since the run read it; resume it with --dataset=npz:PATH naming a "
        f"file of those bytes, at that path or another, not "
        f"--dataset=digits$")):
      rundir.prepare(run_dir, config("digits").to_dict(), True, **rules)
    with pytest.raises(data.DataError, match="changed since the run read"):
      rundir.prepare(run_dir, config(other).to_dict(), True, **rules)
    assert rundir.prepare(run_dir, config(moved).to_dict(), True,
                          respelled=("dataset",), **rules)
    assert rundir.read_config(run_dir)["dataset"] == moved != name
  # The other way round: a run on a registered dataset, resumed on a file.
  digits = SearchConfig(run_dir=str(tmp_path / "digits"), dataset="digits")
  rundir.prepare(digits.run_dir, digits.to_dict(), False,
                 **search._RESUME_RULES)
  with pytest.raises(data.DataError, match=(
      f"^this run was on --dataset=digits; resume it on that data, not "
      f"--dataset=npz:{tmp_path}/moved.npz \\(content sha256 "
      f"{dataset_names.split_name(moved)[1]}...\\)$")):
    rundir.resumable_config(digits.run_dir,
                            digits.replace(dataset=moved).to_dict(),
                            **search._RESUME_RULES)


def test_a_run_directory_keeps_its_data_facts(tmp_path, caplog):
  """A search or retraining run writes dataset.json for an npz file; the
  run's info is read from it without the file, and from the file when the
  record is damaged or of other content."""
  from tfnas.config import TrainConfig
  from tfnas.train import retrain
  _save(tmp_path / "mine.npz", **_bad(GOOD, class_names=np.array(
      ["a", "b", "c"])))
  name = dataset_names.saved_name(f"npz:{tmp_path}/mine.npz")
  run_dir = tmp_path / "run"
  retrain.Retrain(TrainConfig(run_dir=str(run_dir), dataset=name,
                              genotype="DARTS_V2", num_cells=1, channels=2,
                              batch_size=8, pad_crop=1, cutout=0),
                  show_progress=False)
  read = data.dataset_info(name)
  record = run_dir / data.DATASET_RECORD
  assert json.loads(record.read_text())["name"] == name
  (tmp_path / "mine.npz").unlink()
  assert data.run_dataset_info(str(run_dir), name) == read
  with pytest.raises(data.DataError, match="does not exist"):
    data.dataset_info(name)
  _save(tmp_path / "mine.npz", **_arrays(seed=2))
  other = dataset_names.saved_name(f"npz:{tmp_path}/mine.npz")
  caplog.set_level("WARNING")
  assert data.run_dataset_info(str(run_dir), other).mean != read.mean
  assert "describes other data" in caplog.text
  record.write_text("{")
  with pytest.raises(data.DataError, match="changed since the run read it"):
    data.run_dataset_info(str(run_dir), name)
  assert "cannot be read" in caplog.text
  # Registered datasets keep no record.
  assert data.dataset_record(data.dataset_info("digits")) is None


@pytest.mark.slow
def test_a_retrained_run_exports_without_its_data_file(tmp_path):
  """A tfnas-train run exports from its dataset.json with the data file
  gone; without dataset.json (an older run) it needs the file, at its path
  or named by --dataset."""
  from tfnas.config import TrainConfig
  from tfnas.train import retrain
  _save(tmp_path / "mine.npz", **_bad(GOOD, class_names=np.array(
      ["a", "b", "c"])))
  name = dataset_names.saved_name(f"npz:{tmp_path}/mine.npz")
  run_dir = tmp_path / "run"
  retrain.Retrain(TrainConfig(
      run_dir=str(run_dir), dataset=name, genotype="DARTS_V2", num_cells=1,
      channels=2, batch_size=8, pad_crop=1, cutout=0, epochs=1,
      max_steps_per_epoch=1, auxiliary_weight=0.0),
                  show_progress=False).run()
  (tmp_path / "mine.npz").rename(tmp_path / "moved.npz")
  export = lambda where, *more: _run(
      ["-m", "tfnas.apps.export", f"--run_dir={run_dir}",
       f"--export_dir={tmp_path}/{where}", *more], cwd=ROOT)
  done = export("recorded")
  assert done.returncode == 0, done.stderr[-3000:]
  metadata = json.loads(
      (tmp_path / "recorded" / "1" / "metadata.json").read_text())
  assert metadata["class_names"] == ["a", "b", "c"]
  (run_dir / data.DATASET_RECORD).write_text("{")
  broken = export("old")
  assert broken.returncode == 2
  assert (f"{run_dir} has a dataset.json that cannot be used (see the "
          "warning above)") in broken.stderr.splitlines()[-1]
  assert broken.stderr.count("dataset.json cannot be read") == 1
  wrong_kind = export("old", "--dataset=digits")
  assert wrong_kind.stderr.splitlines()[-1].endswith(
      "--dataset=digits: give the run's npz data file where it is now, as "
      "npz:PATH")
  (run_dir / data.DATASET_RECORD).unlink()
  refused = export("old")
  assert refused.returncode == 2
  assert refused.stderr.splitlines()[-1].endswith(_needs_its_file(
      run_dir, tmp_path / "mine.npz", "is not there"))
  moved = export("old", f"--dataset=npz:{tmp_path}/moved.npz")
  assert moved.returncode == 0, moved.stderr[-3000:]
  again = json.loads((tmp_path / "old" / "1" / "metadata.json").read_text())
  for key in ("class_names", "input_shape", "mean", "std", "fingerprint"):
    assert again[key] == metadata[key], key


def test_a_file_replaced_while_read_is_refused(tmp_path, monkeypatch):
  """The images read are the content checked: a file rewritten between the
  fingerprint check and the read, or during the read, is refused, not
  passed off under the run's fingerprint."""
  from tfnas.data import npz_source
  _save(tmp_path / "mine.npz", **GOOD)
  name = dataset_names.saved_name(f"npz:{tmp_path}/mine.npz")
  original = (tmp_path / "mine.npz").read_bytes()

  def then_rewrite(function, seed):
    def call(argument):
      result = function(argument)
      _save(tmp_path / "mine.npz", **_arrays(seed=seed))
      return result
    return call

  read = npz_source._read
  monkeypatch.setattr(npz_source, "_read", then_rewrite(read, 3))
  with pytest.raises(data.DataError, match="changed while it was read"):
    data.dataset_info(name)
  monkeypatch.setattr(npz_source, "_read", read)
  with pytest.raises(data.DataError, match="changed since the run read it"):
    data.dataset_info(name)
  # Rewritten between the check and the read: the version read is checked.
  (tmp_path / "mine.npz").write_bytes(original)
  assert dataset_names.file_fingerprint(tmp_path / "mine.npz") in name
  monkeypatch.setattr(npz_source, "check_file",
                      then_rewrite(npz_source.check_file, 4))
  with pytest.raises(data.DataError, match="changed since the run read it"):
    data.dataset_info(name)


def test_a_damaged_compressed_file_is_one_error(tmp_path):
  path = tmp_path / "c.npz"
  np.savez_compressed(path, **GOOD)
  raw = bytearray(path.read_bytes())
  raw[65] ^= 0xFF  # Inside the first member's compressed data.
  path.write_bytes(bytes(raw))
  with pytest.raises(data.DataError, match="not a readable|damaged"):
    data.dataset_info(f"npz:{path}")


def test_images_to_npz_needs_a_test_share_without_split_folders(tmp_path):
  _image_folder(tmp_path / "photos", [(8, 8), (8, 8)])
  proc = _run([os.path.join(ROOT, "tools", "images_to_npz.py"),
               f"--input_dir={tmp_path}/photos",
               f"--output={tmp_path}/x.npz", "--test_fraction=0"], cwd=ROOT)
  assert proc.returncode == 2
  assert "--test_fraction=0.0 holds out no test images" in proc.stderr


def test_images_to_npz_reads_its_file_back_as_a_search_would(tmp_path):
  # Blank images: the file would be refused by every search (a constant
  # channel cannot be normalised), so the tool writes nothing.
  for name in ("a", "b"):
    (tmp_path / "blank" / name).mkdir(parents=True)
    for i in range(2):
      (tmp_path / "blank" / name / f"{i}.png").write_bytes(
          tf.io.encode_png(np.zeros((8, 8, 1), np.uint8)).numpy())
  proc = _run([os.path.join(ROOT, "tools", "images_to_npz.py"),
               f"--input_dir={tmp_path}/blank", f"--output={tmp_path}/x.npz",
               "--channels=1"], cwd=ROOT)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "x.npz would not be a usable dataset" in proc.stderr
  assert "same value in every pixel" in proc.stderr
  assert sorted(os.listdir(tmp_path)) == ["blank"]  # No partial file left.
