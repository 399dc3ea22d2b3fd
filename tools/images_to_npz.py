"""A folder of labelled images to the NumPy file `--dataset=npz:PATH` reads.

The input folder holds one sub-folder per class, either directly (a test
split is then drawn from each class, --test_fraction) or below train/ and
test/:

    photos/cat/001.jpg, photos/dog/002.png, ...
    photos/train/cat/..., photos/test/cat/..., ...

Classes are the sub-folder names in sorted order (label 0 is the first);
they go into the file as ``class_names``. A top level with ``train/`` and
``test/`` (or ``val/``, any case) is a split layout. Hidden files and
folders are skipped. Images (PNG, JPEG, BMP, GIF: its first frame) are
scaled so that their shorter side is --size and centre-cropped to
--size x --size; without --size they must all be square and of one size.
16-bit PNGs are reduced to 8 bits, and EXIF orientation is not applied
(rotate such photos first).

    python tools/images_to_npz.py --input_dir=photos --output=photos.npz \\
        --size=32
    tfnas-search --flagfile=flags/darts_digits.cfg --dataset=npz:photos.npz
"""

from __future__ import annotations

import os
import re
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tfnas.apps import common  # noqa: E402
from tfnas.errors import TfnasError  # noqa: E402

flags.DEFINE_string("input_dir", None, "Folder of class sub-folders (or of "
                    "train/ and test/ holding them).", required=True)
flags.DEFINE_string("output", None, "The .npz file to write.", required=True)
flags.DEFINE_integer("size", 0, "Side of the square images written (0: keep "
                     "the images' own size, which must be one square size).",
                     lower_bound=0)
flags.DEFINE_enum("channels", "3", ["1", "3"],
                  "3: RGB (grey images are repeated), 1: greyscale.")
flags.DEFINE_float("test_fraction", 0.2, "Without train/ and test/: the "
                   "share of each class's images held out for testing (at "
                   "least one, and one left for training, per class).",
                   lower_bound=0.0, upper_bound=0.9)
flags.DEFINE_integer("seed", 0, "Seed of the test split's draw.")
flags.DEFINE_boolean("overwrite", False, "Replace an existing --output.")
FLAGS = flags.FLAGS

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
# Folder names of a split layout (any case): training, then testing.
TRAIN_NAMES = ("train",)
TEST_NAMES = ("test", "val", "validation")


def _visible(names) -> list[str]:
  return sorted(n for n in names if not n.startswith("."))


def _classes(folder: str) -> list[str]:
  return [d for d in _visible(os.listdir(folder))
          if os.path.isdir(os.path.join(folder, d))]


def _walk_error(error: OSError):
  raise TfnasError(f"cannot read {error.filename} ({error.strerror})")


def _files(folder: str, classes: list[str]) -> list[tuple[str, int]]:
  """(path, label) of every image below ``folder``'s class sub-folders
  (hidden files and folders skipped)."""
  found = []
  for label, name in enumerate(classes):
    class_dir = os.path.join(folder, name)
    if not os.path.isdir(class_dir):
      continue
    for root, dirs, files in os.walk(class_dir, onerror=_walk_error):
      dirs[:] = _visible(dirs)
      for f in _visible(files):
        if f.lower().endswith(EXTENSIONS):
          found.append((os.path.join(root, f), label))
  return found


def _split_folders(folder: str, top: list[str]):
  """The train and test folder names of a split layout (None when the
  top level holds classes)."""
  lower = {name.lower(): name for name in top}
  train = next((lower[n] for n in TRAIN_NAMES if n in lower), None)
  test = next((lower[n] for n in TEST_NAMES if n in lower), None)
  if train is None and test is None:
    return None
  if train is None or test is None:
    raise TfnasError(
        f"--input_dir={folder} has a {train or test}/ folder but no "
        f"{'test/ (or val/)' if test is None else 'train/'} beside it; give "
        "both splits, or class folders only")
  return train, test


def list_images(folder: str, test_fraction: float, seed: int):
  """Class names and the (path, label) lists of the train and test split."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(folder):
    raise TfnasError(f"--input_dir={folder} is not a folder")
  top = _classes(folder)
  splits = _split_folders(folder, top)
  if splits is not None:
    train_dir, test_dir = (os.path.join(folder, name) for name in splits)
    classes = sorted(set(_classes(train_dir)) | set(_classes(test_dir)))
    train = _files(train_dir, classes)
    test = _files(test_dir, classes)
    others = [name for name in top if name not in splits]
    if others:
      print(f"ignored beside {splits[0]}/ and {splits[1]}/: "
            f"{', '.join(others)}")
  else:
    if test_fraction <= 0:
      raise TfnasError(f"--test_fraction={test_fraction} holds out no test "
                       f"images, and --input_dir={folder} has no train/ and "
                       "test/ folders; give a fraction above 0")
    classes = top
    train, test = [], []
    rng = np.random.default_rng(seed)
    every = _files(folder, classes)
    for label in range(len(classes)):
      mine = [item for item in every if item[1] == label]
      order = rng.permutation(len(mine))
      held = int(round(test_fraction * len(mine)))
      if len(mine) > 1:  # At least one image on each side.
        held = min(max(held, 1), len(mine) - 1)
      test += [mine[i] for i in sorted(order[:held])]
      train += [mine[i] for i in sorted(order[held:])]
  if len(classes) < 2:
    raise TfnasError(f"--input_dir={folder} has {len(classes)} class "
                     "sub-folder(s); a classifier needs at least two")
  for split, items in (("train", train), ("test", test)):
    if not items:
      raise TfnasError(f"--input_dir={folder}: no {split} images (file "
                       f"names ending in {', '.join(EXTENSIONS)})")
  return classes, train, test


def _error_text(error) -> str:
  """TensorFlow's error message without its op-location prefix."""
  text = error.message.splitlines()[0] if error.message else str(error)
  return re.sub(r"\{\{[^}]*\}\}\s*", "", text).strip()


def _with_channels(tf, image, channels: int):
  """``image`` (1-4 channels as decoded) with ``channels`` channels: colour
  to grey by luminance, grey repeated, alpha dropped."""
  have = image.shape[-1]
  if have in (2, 4):  # Grey or colour with alpha.
    image = image[..., :have - 1]
    have -= 1
  if channels == have:
    return image
  if channels == 1:
    return tf.cast(tf.round(tf.image.rgb_to_grayscale(
        tf.cast(image, tf.float32))), tf.uint8)
  return tf.image.grayscale_to_rgb(image)


def read_images(items, size: int, channels: int):
  """uint8 ``(N, size, size, channels)`` images and int64 labels (without
  ``size``: the images' own size, the same square for all)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  images, first = [], None
  for path, _ in items:
    try:
      image = tf.io.decode_image(tf.io.read_file(path), channels=0,
                                 expand_animations=False)
    except tf.errors.OpError as e:
      raise TfnasError(f"{path} is not a readable image "
                       f"({_error_text(e)})") from None
    if image.dtype != tf.uint8:  # 16-bit PNG: to 8 bits.
      image = tf.image.convert_image_dtype(image, tf.uint8)
    image = _with_channels(tf, image, channels)
    if size:
      height, width = image.shape[0], image.shape[1]
      scale = size / min(height, width)
      new = (max(size, round(height * scale)), max(size, round(width * scale)))
      image = tf.image.resize(image, new, antialias=True)
      image = tf.image.resize_with_crop_or_pad(image, size, size)
      image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    shape = tuple(image.shape)
    first = first or (path, shape)
    if shape[0] != shape[1] or shape != first[1]:
      # At the first image that differs: a folder of large photos would
      # fill the memory before a check at the end.
      raise TfnasError(
          f"{path} is {shape[0]}x{shape[1]}"
          + (f" but {first[0]} {first[1][0]}x{first[1][1]}"
             if shape[0] == shape[1] else " (not square)")
          + "; pass --size=N to scale and crop every image to N x N")
    images.append(image.numpy())
  labels = np.array([label for _, label in items], dtype=np.int64)
  return np.stack(images), labels


@common.clean_errors("images_to_npz")
def main(argv):
  del argv
  output = os.path.expanduser(FLAGS.output)
  if not output.endswith(".npz"):
    raise TfnasError(f"--output={FLAGS.output} must end in .npz")
  if os.path.isdir(output):
    raise TfnasError(f"--output={FLAGS.output} is a folder")
  if os.path.exists(output) and not FLAGS.overwrite:
    raise TfnasError(f"--output={FLAGS.output} exists; pass --overwrite to "
                     "replace it")
  parent = os.path.dirname(os.path.abspath(output))
  if not os.path.isdir(parent):
    raise TfnasError(f"--output={FLAGS.output}: the folder {parent} does "
                     "not exist")
  if not os.access(parent, os.W_OK):
    raise TfnasError(f"--output={FLAGS.output}: the folder {parent} is not "
                     "writable")
  try:
    classes, train, test = list_images(os.path.expanduser(FLAGS.input_dir),
                                       FLAGS.test_fraction, FLAGS.seed)
  except OSError as e:
    raise TfnasError(f"cannot read {e.filename} ({e.strerror})") from None
  from tfnas.apps import startup  # pylint: disable=import-outside-toplevel
  startup.import_tensorflow()
  import numpy as np  # pylint: disable=import-outside-toplevel
  channels = int(FLAGS.channels)
  x_train, y_train = read_images(train, FLAGS.size, channels)
  x_test, y_test = read_images(test, FLAGS.size, channels)
  if x_train.shape[1:] != x_test.shape[1:]:
    raise TfnasError(f"train images are {x_train.shape[1:]} but test images "
                     f"{x_test.shape[1:]}; pass --size=N")
  from tfnas import data  # pylint: disable=import-outside-toplevel
  partial = output[:-len(".npz")] + ".partial.npz"
  try:
    np.savez(partial, x_train=x_train, y_train=y_train, x_test=x_test,
             y_test=y_test, class_names=np.array(classes))
    # Read back as a search reads it: the same checks, and the same
    # warnings (e.g. a class without training images).
    data.dataset_info(f"npz:{os.path.abspath(partial)}")
    os.replace(partial, output)
  except OSError as e:
    raise TfnasError(f"cannot write {FLAGS.output} ({e.strerror or e}); "
                     "nothing was written") from None
  except data.DataError as e:
    raise TfnasError(f"{FLAGS.output} would not be a usable dataset ({e}); "
                     "nothing was written") from None
  finally:
    if os.path.isfile(partial):
      os.remove(partial)
  side = x_train.shape[1]
  print(f"{FLAGS.output}: {len(y_train)} train and {len(y_test)} test "
        f"images of {side}x{side}x{channels}, {len(classes)} classes "
        f"({', '.join(classes[:8])}{', ...' if len(classes) > 8 else ''}); "
        f"search with --dataset=npz:{FLAGS.output}")


if __name__ == "__main__":
  common.run_app(main, __doc__)
