"""SavedModel export: fresh-process reload, signature, no overwrites."""

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests import helpers
from tfnas import export, models
from tfnas.block_genotype import BlockGenotype
from tfnas.genotype import CellGenotype, Genotype
from tfnas.train import rundir

GENOTYPE = Genotype(
    CellGenotype(((("sep_conv_3x3", 0), ("skip_connect", 1)), ()),
                 concat=(2, 3)),
    CellGenotype(((("max_pool_3x3", 0), ("dil_conv_3x3", 1)),
                  (("skip_connect", 2),))))
METADATA = {"dataset": "synthetic", "input_shape": [8, 8, 3],
            "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3],
            "num_classes": 4}


def trained_like_network(seed=0):
  net = models.build_network("cifar", GENOTYPE, (8, 8, 3), 4, 3, 4,
                             auxiliary=True)
  # Move BN statistics and weights away from their initial values so that
  # the comparison covers them.
  rng = np.random.default_rng(seed)
  for v in net.weights:
    if "drop_path" in v.path:
      continue
    value = v.numpy()
    if "moving_variance" in v.path:
      v.assign(rng.uniform(0.5, 2.0, value.shape).astype(value.dtype))
    else:
      v.assign(value + 0.1 * rng.standard_normal(value.shape).astype(
          value.dtype))
  return net


def pixels(n=5, seed=1):
  rng = np.random.default_rng(seed)
  return rng.uniform(0, 255, (n, 8, 8, 3)).astype(np.float32)


def in_memory(net, images):
  x = (images / 255.0 - np.array(METADATA["mean"], np.float32)) / np.array(
      METADATA["std"], np.float32)
  return net(tf.constant(x), training=False).numpy()


def test_fresh_process_reload_matches_in_memory_model(tmp_path):
  net = trained_like_network()
  path = export.export_saved_model(net, str(tmp_path / "serving"),
                                   metadata=METADATA, genotype=GENOTYPE)
  assert path == str(tmp_path / "serving" / "1")
  images = pixels()
  out = helpers.serve_in_fresh_process(path, images, tmp_path)
  expected = in_memory(net, images)
  assert np.abs(out["logits"] - expected).max() < 1e-5
  probs = tf.nn.softmax(expected).numpy()
  assert np.abs(out["probabilities"] - probs).max() < 1e-5
  assert np.abs(expected).max() > 1e-3  # Not a trivially zero network.
  assert Genotype.load(os.path.join(path, "genotype.json")) == GENOTYPE
  meta = json.loads(open(os.path.join(path, "metadata.json")).read())
  assert meta["input"]["shape"] == [None, 8, 8, 3]
  assert meta["dataset"] == "synthetic" and len(meta["fingerprint"]) == 64
  assert os.path.exists(os.path.join(path, "assets.extra", "metadata.json"))


def test_block_genotype_is_written_and_fingerprinted(tmp_path):
  # A single-path child's architecture (ShuffleNet space), as a DSNAS export
  # writes it; the exporter only needs to_dict/to_json, whatever the model.
  net = trained_like_network()
  blocks = BlockGenotype(("choice_3", "choice_x", "choice_5"))
  base = str(tmp_path / "m")
  path = export.export_saved_model(net, base, metadata=METADATA,
                                   genotype=blocks)
  for directory in (path, os.path.join(path, "assets.extra")):
    assert BlockGenotype.load(os.path.join(directory,
                                           "genotype.json")) == blocks
  assert export.export_saved_model(net, base, metadata=METADATA,
                                   genotype=blocks, version=1) == path
  other = BlockGenotype(("choice_3",) * 3)
  with pytest.raises(export.ExportError, match="already holds a different"):
    export.export_saved_model(net, base, metadata=METADATA, genotype=other,
                              version=1)


def test_a_random_op_is_refused_unless_allowed(tmp_path):
  # The model stands in: what is checked is the genotype it is exported with.
  net = trained_like_network()
  noisy = Genotype(GENOTYPE.normal, CellGenotype(
      ((("noise", 0), ("dil_conv_3x3", 1)), (("skip_connect", 2),))))
  base = str(tmp_path / "m")
  with pytest.raises(export.ExportError,
                     match="uses noise.*--allow_random_ops"):
    export.export_saved_model(net, base, metadata=METADATA, genotype=noisy)
  assert not os.path.exists(base)
  path = export.export_saved_model(net, base, metadata=METADATA,
                                   genotype=noisy, allow_random_ops=True)
  with open(os.path.join(path, "metadata.json")) as f:
    assert json.load(f)["random_ops"] == ["noise"]


def test_saved_model_cli_lists_the_signature(tmp_path):
  net = trained_like_network()
  path = export.export_saved_model(net, str(tmp_path / "m"),
                                   metadata=METADATA)
  cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
  env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([cli, "show", "--dir", path, "--all"], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = proc.stdout
  assert "signature_def['serving_default']" in text
  assert "inputs['images']" in text and "(-1, 8, 8, 3)" in text
  assert "outputs['logits']" in text and "outputs['probabilities']" in text


def test_no_overwrite_of_a_different_model(tmp_path):
  base = str(tmp_path / "m")
  net = trained_like_network()
  first = export.export_saved_model(net, base, metadata=METADATA, version=3)
  before = {p: open(os.path.join(dp, p), "rb").read()
            for dp, _, files in os.walk(first) for p in files}
  # Same model again: the existing version is returned, untouched, also
  # when measured anew (a measurement is not part of the model).
  assert export.export_saved_model(net, base, metadata=METADATA,
                                   version=3) == first
  assert export.export_saved_model(
      net, base, metadata=dict(METADATA, val_acc=0.5, val_split="test"),
      version=3) == first
  # Nor do facts of the dataset (hashed by its name) added to later
  # versions of tfnas: an export made before them keeps its fingerprint.
  assert export.export_saved_model(
      net, base, metadata=dict(METADATA, source_pixel_max=16.0),
      version=3) == first
  # Nor where its sources lay: a run directory (and its npz data file)
  # moved or copied elsewhere.
  placed = lambda where: dict(
      METADATA, run_dir=f"/{where}/run", checkpoint=f"/{where}/run/ckpt-3",
      dataset=f"npz:/{where}/mine.npz#sha256:0123456789abcdef")
  placed_first = export.export_saved_model(net, base, metadata=placed("a"))
  placed_version = int(os.path.basename(placed_first))
  assert placed_first != first
  assert export.export_saved_model(net, base, metadata=placed("b"),
                                   version=placed_version) == placed_first
  other_data = dict(placed("a"), dataset="npz:/a/mine.npz#sha256:"
                    "fedcba9876543210")
  with pytest.raises(export.ExportError, match="already holds a different"):
    export.export_saved_model(net, base, metadata=other_data,
                              version=placed_version)
  # An export fingerprinted with the locations in (before they were left
  # out) is still this model where the run has not moved.
  meta_path = os.path.join(placed_first, "metadata.json")
  written = json.loads(open(meta_path).read())
  written["fingerprint"] = export.model_fingerprint(net, placed("a"),
                                                    located=True)
  with open(meta_path, "w") as f:
    json.dump(written, f)
  assert export.export_saved_model(net, base, metadata=placed("a"),
                                   version=placed_version) == placed_first
  with pytest.raises(export.ExportError, match="already holds a different"):
    export.export_saved_model(net, base, metadata=placed("b"),
                              version=placed_version)
  other = trained_like_network(seed=5)
  with pytest.raises(export.ExportError, match="already holds a different"):
    export.export_saved_model(other, base, metadata=METADATA, version=3)
  after = {p: open(os.path.join(dp, p), "rb").read()
           for dp, _, files in os.walk(first) for p in files}
  assert before == after
  # Without a version the next number is used.
  assert export.export_saved_model(other, base, metadata=METADATA).endswith(
      os.sep + "5")
  # ...and the same model again, without a version, is that version.
  assert export.export_saved_model(other, base, metadata=METADATA).endswith(
      os.sep + "5")
  assert not [d for d in os.listdir(base) if d.startswith(".tmp")]
  # Readable like any new folder (a temp folder's mode is owner-only).
  assert stat.S_IMODE(os.stat(first).st_mode) == rundir.new_dir_mode()
  # An empty version folder (made by hand) is written into; one holding
  # something else is refused as what it is, and kept.
  os.makedirs(os.path.join(base, "7"))
  assert export.export_saved_model(other, base, metadata=METADATA,
                                   version=7).endswith(os.sep + "7")
  assert os.path.exists(os.path.join(base, "7", "saved_model.pb"))
  os.makedirs(os.path.join(base, "8"))
  open(os.path.join(base, "8", "notes.txt"), "w").close()
  with pytest.raises(export.ExportError, match="8 already exists and is not "
                                               "a tfnas export"):
    export.export_saved_model(other, base, metadata=METADATA, version=8)
  assert os.listdir(os.path.join(base, "8")) == ["notes.txt"]


def test_an_export_path_under_a_file_is_one_clear_error(tmp_path):
  (tmp_path / "afile").write_text("mine")
  with pytest.raises(export.ExportError,
                     match=r"cannot create the export path .*afile/m: Not a "
                           r"directory"):
    export.export_saved_model(trained_like_network(),
                              str(tmp_path / "afile" / "m"),
                              metadata=METADATA)
  assert (tmp_path / "afile").read_text() == "mine"


def test_bad_metadata(tmp_path):
  net = trained_like_network()
  with pytest.raises(export.ExportError, match="mean"):
    export.export_saved_model(net, str(tmp_path / "m"),
                              metadata={"input_shape": [8, 8, 3]})
  with pytest.raises(export.ExportError, match="one value per channel"):
    export.export_saved_model(
        net, str(tmp_path / "m"),
        metadata=dict(METADATA, mean=[0.5]))
  assert not os.path.exists(tmp_path / "m")


def test_readme_rest_body_fits_the_signature(tmp_path):
  # The README's TF Serving :predict body, fed to the exported signature of
  # a digits-shaped network (what TF Serving does with "instances").
  import re
  readme = open(os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "README.md")).read()
  body = json.loads(next(block for block in
                         re.findall(r"```json\n(.*?)\n```", readme, re.S)
                         if '"signature_name"' in block))
  assert body["signature_name"] == export.SIGNATURE
  images = np.asarray(body["instances"], np.float32)
  assert images.shape == (1, 8, 8, 1) and images.max() <= 255
  net = models.build_network("cifar", GENOTYPE, (8, 8, 1), 10, 2, 4,
                             auxiliary=False)
  meta = dict(METADATA, input_shape=[8, 8, 1], mean=[0.3], std=[0.4])
  path = export.export_saved_model(net, str(tmp_path / "digits"),
                                   metadata=meta)
  fn = tf.saved_model.load(path).signatures[body["signature_name"]]
  out = fn(images=tf.constant(images))
  assert out["probabilities"].shape == (1, 10)
  np.testing.assert_allclose(out["probabilities"].numpy().sum(), 1.0,
                             rtol=1e-5)


def test_serving_signature_refuses_wrongly_shaped_images(tmp_path):
  # In a fresh process: without the check, a wrong rank aborted TensorFlow.
  path = export.export_saved_model(trained_like_network(),
                                   str(tmp_path / "serving"),
                                   metadata=METADATA, genotype=GENOTYPE)
  script = f"""
import numpy as np, tensorflow as tf
fn = tf.saved_model.load({path!r}).signatures["serving_default"]
print("ok", fn(images=tf.zeros([2, 8, 8, 3]))["logits"].shape)
for shape in ([1, 8, 8], [1, 192], [1, 16, 16, 3], [1, 8, 8, 1]):
  try:
    fn(images=tf.zeros(shape))
    print("accepted", shape)
  except tf.errors.InvalidArgumentError as e:
    print("refused", shape, "[?,8,8,3]" in e.message)
"""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True,
                        text=True, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  assert lines[0] == "ok (2, 4)"
  assert lines[1:] == [f"refused {s} True" for s in
                       ([1, 8, 8], [1, 192], [1, 16, 16, 3], [1, 8, 8, 1])]


def test_fingerprint_leaves_derived_weights_out():
  # A noise op's seed comes from the layer's path, not training: exports
  # made before the seed existed keep their fingerprints.
  genotype = Genotype(GENOTYPE.normal, CellGenotype(
      ((("noise", 0), ("dil_conv_3x3", 1)), (("skip_connect", 2),))))
  net = models.NetworkCIFAR(genotype, num_classes=10, num_cells=3,
                            channels=4, auxiliary=False)
  net(tf.zeros([1, 8, 8, 3]), training=False)
  seeds = [w for w in net.weights if w.path.endswith("edge_seed")]
  assert len(seeds) == 2  # Both reduction cells.
  before = export.model_fingerprint(net, METADATA, genotype)
  for seed in seeds:
    seed.assign(seed.value + 1)
  assert export.model_fingerprint(net, METADATA, genotype) == before
  kernel = next(w for w in net.weights if w.path.endswith("kernel"))
  kernel.assign(kernel.value + 1.0)
  assert export.model_fingerprint(net, METADATA, genotype) != before
