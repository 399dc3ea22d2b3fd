"""A folder of labelled images to the NumPy file `--dataset=npz:PATH` reads.

The input folder holds one sub-folder per class, either directly (a test
split is then drawn from each class, --test_fraction) or below train/ and
test/:

    photos/cat/001.jpg, photos/dog/002.png, ...
    photos/train/cat/..., photos/test/cat/..., ...

Classes are the sub-folder names in sorted order (label 0 is the first);
they go into the file as ``class_names``. Images (PNG, JPEG, BMP, GIF) are
scaled so that their shorter side is --size and centre-cropped to
--size x --size; without --size they must all be square and of one size.

    python tools/images_to_npz.py --input_dir=photos --output=photos.npz \\
        --size=32
    tfnas-search --flagfile=flags/darts_digits.cfg --dataset=npz:photos.npz
"""

from __future__ import annotations

import os
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
                   "share of each class's images held out for testing.",
                   lower_bound=0.0, upper_bound=0.9)
flags.DEFINE_integer("seed", 0, "Seed of the test split's draw.")
flags.DEFINE_boolean("overwrite", False, "Replace an existing --output.")
FLAGS = flags.FLAGS

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


def _classes(folder: str) -> list[str]:
  return sorted(d for d in os.listdir(folder)
                if os.path.isdir(os.path.join(folder, d))
                and not d.startswith("."))


def _files(folder: str, classes: list[str]) -> list[tuple[str, int]]:
  """(path, label) of every image below ``folder``'s class sub-folders."""
  found = []
  for label, name in enumerate(classes):
    class_dir = os.path.join(folder, name)
    if not os.path.isdir(class_dir):
      continue
    for root, dirs, files in os.walk(class_dir):
      dirs.sort()
      for f in sorted(files):
        if f.lower().endswith(EXTENSIONS):
          found.append((os.path.join(root, f), label))
  return found


def list_images(folder: str, test_fraction: float, seed: int):
  """Class names and the (path, label) lists of the train and test split."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(folder):
    raise TfnasError(f"--input_dir={folder} is not a folder")
  top = _classes(folder)
  if "train" in top and "test" in top:
    classes = sorted(set(_classes(os.path.join(folder, "train"))) |
                     set(_classes(os.path.join(folder, "test"))))
    train = _files(os.path.join(folder, "train"), classes)
    test = _files(os.path.join(folder, "test"), classes)
  else:
    classes = top
    train, test = [], []
    rng = np.random.default_rng(seed)
    every = _files(folder, classes)
    for label in range(len(classes)):
      mine = [item for item in every if item[1] == label]
      order = rng.permutation(len(mine))
      held = int(round(test_fraction * len(mine)))
      if test_fraction > 0 and len(mine) > 1:
        held = max(held, 1)
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


def read_images(items, size: int, channels: int):
  """uint8 ``(N, size, size, channels)`` images and int64 labels."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  images, shapes = [], set()
  for path, _ in items:
    try:
      image = tf.io.decode_image(tf.io.read_file(path), channels=channels,
                                 expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
      raise TfnasError(f"{path} is not a readable image "
                       f"({e.message.splitlines()[0]})") from None
    if size:
      height, width = image.shape[0], image.shape[1]
      scale = size / min(height, width)
      new = (max(size, round(height * scale)), max(size, round(width * scale)))
      image = tf.image.resize(image, new, antialias=True)
      image = tf.image.resize_with_crop_or_pad(image, size, size)
      image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    shapes.add(tuple(image.shape))
    images.append(image.numpy())
  if len(shapes) > 1 or (not size and images and
                         images[0].shape[0] != images[0].shape[1]):
    listed = ", ".join("x".join(map(str, s)) for s in sorted(shapes)[:4])
    more = ", ..." if len(shapes) > 4 else ""
    raise TfnasError(f"the images are of the sizes {listed}{more}; pass "
                     "--size=N to scale and crop them to N x N")
  labels = np.array([label for _, label in items], dtype=np.int64)
  return np.stack(images), labels


@common.clean_errors("images_to_npz")
def main(argv):
  del argv
  if not FLAGS.output.endswith(".npz"):
    raise TfnasError(f"--output={FLAGS.output} must end in .npz")
  if os.path.exists(FLAGS.output) and not FLAGS.overwrite:
    raise TfnasError(f"--output={FLAGS.output} exists; pass --overwrite to "
                     "replace it")
  classes, train, test = list_images(FLAGS.input_dir, FLAGS.test_fraction,
                                     FLAGS.seed)
  from tfnas.apps import startup  # pylint: disable=import-outside-toplevel
  startup.import_tensorflow()
  import numpy as np  # pylint: disable=import-outside-toplevel
  channels = int(FLAGS.channels)
  x_train, y_train = read_images(train, FLAGS.size, channels)
  x_test, y_test = read_images(test, FLAGS.size, channels)
  if x_train.shape[1:] != x_test.shape[1:]:
    raise TfnasError(f"train images are {x_train.shape[1:]} but test images "
                     f"{x_test.shape[1:]}; pass --size=N")
  partial = FLAGS.output[:-len(".npz")] + ".partial.npz"
  np.savez(partial, x_train=x_train, y_train=y_train, x_test=x_test,
           y_test=y_test, class_names=np.array(classes))
  os.replace(partial, FLAGS.output)
  side = x_train.shape[1]
  print(f"{FLAGS.output}: {len(y_train)} train and {len(y_test)} test "
        f"images of {side}x{side}x{channels}, {len(classes)} classes "
        f"({', '.join(classes[:8])}{', ...' if len(classes) > 8 else ''}); "
        f"search with --dataset=npz:{FLAGS.output}")


if __name__ == "__main__":
  common.run_app(main, __doc__)
