"""The search loop: learning, resume, distribution, run-directory safety."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tfnas import data
from tfnas.config import SearchConfig
from tfnas.distribute import mirrored_strategy
from tfnas.errors import TfnasError
from tfnas.estimators.darts import DartsFirstOrder, DartsSecondOrder
from tfnas.genotype import Genotype
from tfnas.train import rundir
from tfnas.train.search import Search, SearchData
from tests import helpers


def tiny_config(run_dir, **overrides):
  # S3 (none, skip, sep_conv_3x3): the loop is what these tests check, and
  # a third of DARTS's eight ops traces in a third of the time.
  kwargs = dict(run_dir=str(run_dir), dataset="digits", method="darts_1st",
                space="s3", num_cells=3, num_nodes=2, channels=4, batch_size=32,
                epochs=2, max_steps_per_epoch=3, steps_per_loop=2,
                w_lr=0.05, arch_lr=3e-3, seed=3)
  kwargs.update(overrides)
  return SearchConfig(**kwargs)


class SearchLoopTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    tf.config.experimental.enable_op_determinism()

  def test_resume_matches_uninterrupted_run(self):
    base = self.get_temp_dir()
    straight = Search(tiny_config(os.path.join(base, "a")),
                      show_progress=False).run()
    config = tiny_config(os.path.join(base, "b"))
    first = Search(config, show_progress=False).run(stop_after_epochs=1)
    self.assertLen(first.history, 1)
    resumed = Search(config, resume=True, show_progress=False).run()
    self.assertLen(resumed.history, 1)
    self.assertEqual(resumed.history[0]["epoch"], 2)
    for group in straight.alphas:
      self.assertAllClose(straight.alphas[group], resumed.alphas[group],
                          atol=1e-6)
      # α really moved, so equality is not trivial.
      self.assertGreater(np.abs(straight.alphas[group] -
                                first.alphas[group]).max(), 1e-5)
    self.assertEqual(straight.genotype, resumed.genotype)
    saved = Genotype.load(os.path.join(base, "b", "genotype.json"))
    self.assertEqual(saved, resumed.genotype)

    # Read-only (tools/child_eval.py): the finished run's own evaluation,
    # nothing in its directory written (no config, list or event file).
    run_a = os.path.join(base, "a")
    files = lambda: {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
                     for d, _, names in os.walk(run_a) for f in names}
    before = files()
    reader = Search(tiny_config(run_a), show_progress=False, read_only=True)
    # What it evaluates, as child_eval.py reports it.
    self.assertEqual(reader.restored,
                     tf.train.latest_checkpoint(os.path.join(run_a, "ckpt")))
    self.assertEqual(int(reader.epoch.numpy()), 2)
    measured = reader.evaluate()
    for key in ("val/acc", "val/loss"):
      self.assertAllClose(measured[key], straight.history[-1][key])
    self.assertEqual(files(), before)
    with self.assertRaisesRegex(TfnasError, "does not run"):
      reader.run()

    # Epoch 2's checkpoint lost: a resume repeats that epoch from epoch 1's.
    # TensorBoard shows every step once (the repeated ones with their new
    # values), as in the straight run.
    run_b = os.path.join(base, "b")
    newest = tf.train.latest_checkpoint(os.path.join(run_b, "ckpt"))
    os.remove(newest + ".index")
    with self.assertLogs(level="WARNING"):
      again = Search(config, resume=True, show_progress=False).run()
    self.assertEqual([h["epoch"] for h in again.history], [2])
    tensors = lambda run: _tensor_steps(os.path.join(base, run, "tb"))
    self.assertEqual(tensors("b"), tensors("a"))
    self.assertIn(6, tensors("b")["train/step_loss"])

  def test_resume_after_the_last_step_of_an_epoch(self):
    # A SIGTERM right after an epoch's last step saves step == steps; the
    # resumed run must still finish that epoch (eval, checkpoint, genotype).
    run_dir = os.path.join(self.get_temp_dir(), "edge")
    config = tiny_config(run_dir, epochs=1)
    search = Search(config, show_progress=False)
    search.step_in_epoch.assign(search.data.steps_per_epoch)
    search._save()
    result = Search(config, resume=True, show_progress=False).run()
    self.assertLen(result.history, 1)
    self.assertIn("val/acc", result.history[0])
    self.assertNotIn("train/acc", result.history[0])
    self.assertTrue(os.path.exists(os.path.join(run_dir, "genotype.json")))

  def test_the_start_line_says_what_the_search_runs(self):
    base = self.get_temp_dir()
    two_level = Search(tiny_config(os.path.join(base, "d")),
                       show_progress=False)
    params = sum(int(np.prod(v.shape))
                 for v in two_level.network.trainable_weights)
    self.assertEqual(
        two_level.describe(),
        f"darts_1st search, s3 space (3 cells of 2 nodes, C=4, "
        f"{params / 1e6:.3f}M supernet parameters); digits: 748 train / 749 "
        "held-out images, 3 steps per epoch x 2 epochs (the first steps also "
        "trace the step graph)")
    single = Search(tiny_config(os.path.join(base, "s"), method="snas"),
                    show_progress=False)
    self.assertIn("digits: 1497 train / 300 test images", single.describe())
    # A batch larger than a split says which sizes fit.
    with self.assertRaisesRegex(data.DataError, r"--batch_size=800 is larger "
                                r"than the search splits \(748 train / 749 "
                                r"val\): use --batch_size=748 or less"):
      Search(tiny_config(os.path.join(base, "b"), batch_size=800),
             show_progress=False)
    # ... and a batch that splits evenly over the replicas.
    too_large = tiny_config(os.path.join(base, "b"), batch_size=800)
    with self.assertRaisesRegex(data.DataError, r"use a --batch_size that "
                                r"is a multiple of the 8 replicas, at most "
                                r"744$"):
      SearchData(too_large, replicas=8)
    with self.assertRaisesRegex(data.DataError, r"val\), which hold fewer "
                                r"examples than the 1000 replicas$"):
      SearchData(too_large, replicas=1000)

  def test_ctrl_c_as_an_epoch_is_saved_keeps_its_metrics(self):
    helpers.ctrl_c_as_an_epoch_is_saved(
        self, Search, tiny_config(os.path.join(self.get_temp_dir(), "r")))

  def test_resume_mid_epoch_keeps_the_epochs_train_metrics(self):
    # A stop after the first chunk (2 of 3 steps) records the sums of those
    # steps with the checkpoint; the resumed epoch reports all three.
    base = self.get_temp_dir()
    helpers.stop_mid_epoch_and_resume(
        self, Search, tiny_config(os.path.join(base, "a"), epochs=1),
        tiny_config(os.path.join(base, "b"), epochs=1),
        ("train/loss", "train/acc", "search/val_loss"))

  def test_run_dir_refuses_other_run_and_keeps_files(self):
    run_dir = os.path.join(self.get_temp_dir(), "r")
    Search(tiny_config(run_dir, epochs=1), show_progress=False).run()
    before = {f: os.path.getmtime(os.path.join(run_dir, f))
              for f in os.listdir(run_dir)}
    with self.assertRaisesRegex(rundir.RunDirError, "already holds a run"):
      Search(tiny_config(run_dir, epochs=1), show_progress=False)
    with self.assertRaisesRegex(rundir.RunDirError, "different config"):
      Search(tiny_config(run_dir, channels=6), resume=True, show_progress=False)
    # Named before the other dataset's (missing) files are looked for.
    with self.assertRaisesRegex(rundir.RunDirError,
                                "different config .*dataset: 'digits'"):
      Search(tiny_config(run_dir, dataset="cifar10",
                         data_dir=os.path.join(run_dir, "none")),
             resume=True, show_progress=False)
    after = {f: os.path.getmtime(os.path.join(run_dir, f))
             for f in os.listdir(run_dir)}
    self.assertEqual(before, after)

  def test_loss_goes_down_second_order(self):
    run_dir = os.path.join(self.get_temp_dir(), "second")
    result = Search(tiny_config(run_dir, method="darts_2nd", epochs=3,
                                max_steps_per_epoch=6, channels=8),
                    show_progress=False).run()
    losses = [h["train/loss"] for h in result.history]
    self.assertLess(losses[-1], losses[0])
    with open(os.path.join(run_dir, "arch.json")) as f:
      record = json.load(f)
    self.assertEqual(record["groups"]["normal"]["candidates"][0], "none")


def _tensor_steps(log_dir):
  """tag → the steps TensorBoard shows it at (a step twice: listed twice),
  read as TensorBoard's ``--load_fast=false`` loader reads them."""
  from tensorboard.backend.event_processing import plugin_event_accumulator
  events = plugin_event_accumulator.EventAccumulator(
      log_dir, size_guidance={"tensors": 0})
  events.Reload()
  return {tag: [e.step for e in events.Tensors(tag)]
          for tag in events.Tags()["tensors"]}


def test_optimizer_settings_reach_both_optimizers(tmp_path):
  config = tiny_config(tmp_path / "r", w_momentum=0.8, w_weight_decay=5e-4,
                       grad_clip=3.0, arch_lr=2e-3, arch_beta1=0.6,
                       arch_beta2=0.99, arch_weight_decay=2e-3)
  search = Search(config, show_progress=False)
  w, a = search.w_opt, search.a_opt
  assert (w.momentum, w.weight_decay, w.clip_norm) == (0.8, 5e-4, 3.0)
  assert float(a.current_lr()) == pytest.approx(2e-3)
  assert (a.beta_1, a.beta_2, a.weight_decay) == (0.6, 0.99, 2e-3)


def test_checkpoint_holds_every_network_variable(tmp_path):
  """Cells, edges and ops kept in lists/dicts are checkpoint dependencies."""
  from tfnas.spaces import darts as darts_space
  net = darts_space.build_search_network(helpers.tiny_space(), (8, 8, 3))
  path = tf.train.Checkpoint(network=net).write(str(tmp_path / "ckpt"))
  saved = [n for n, _ in tf.train.list_variables(path)
           if n.endswith("VARIABLE_VALUE")]
  assert len(saved) == len(net.variables)
  assert any("moving_mean" in n and "cell_0" in n for n in saved)


def mirrored_cpu_strategy():
  return mirrored_strategy(["/cpu:0", "/cpu:1"])



class MirroredStepTest(tf.test.TestCase):
  """One step under MirroredStrategy (2 CPUs) equals the default strategy."""

  def _step(self, strategy, estimator, init, dtype, phased=False):
    with strategy.scope():
      ctx = helpers.tiny_context(
          space=helpers.replica_space(sync_batch_norm=True), global_batch=4,
          dtype=dtype)
      estimator.build(ctx)
    for v, value in zip(ctx.weight_variables + ctx.arch_variables, init):
      v.assign(value)
    np_dtype = dtype.as_numpy_dtype
    train = helpers.batch(seed=1, dtype=np_dtype)
    val = helpers.batch(seed=2, dtype=np_dtype)
    dataset = tf.data.Dataset.from_tensors((train, val))
    dist = strategy.experimental_distribute_dataset(dataset)

    def compile_phase(phase):
      @tf.function(autograph=False)  # As the loop traces its steps.
      def run(batches):
        return strategy.run(phase, args=(ctx, batches[0], batches[1],
                                         tf.constant(0, tf.int64)))
      return run
    # As the search loop runs it (one tf.function per phase) or all in one.
    phases = estimator.phases() if phased else [estimator.step]
    compiled = [compile_phase(p) for p in phases]
    for batches in dist:
      for run in compiled:
        run(batches)
    return [v.numpy() for v in ctx.weight_variables + ctx.arch_variables]

  def _compare(self, estimator, dtype=tf.float32, atol=2e-5, rtol=1e-4):
    default = tf.distribute.get_strategy()
    with default.scope():
      ctx = helpers.tiny_context(space=helpers.replica_space(), dtype=dtype)
      init = [v.numpy() for v in ctx.weight_variables + ctx.arch_variables]
    single = self._step(default, estimator, init, dtype)
    mirrored = self._step(mirrored_cpu_strategy(), estimator, init, dtype,
                          phased=True)
    moved = max(np.abs(a - b).max() for a, b in zip(single, init))
    self.assertGreater(moved, 1e-4)
    for a, b in zip(single, mirrored):
      self.assertAllClose(a, b, atol=atol, rtol=rtol)

  def test_first_order(self):
    self._compare(DartsFirstOrder())

  def test_second_order(self):
    # float64: the finite-difference Hessian term divides float32 round-off
    # (which differs with the summation order of two replicas) by 2ε, and
    # Adam's first step is ±lr per α entry, so a near-zero entry could flip
    # sign in float32.
    # Graph optimisation (grappler) of the mirrored second-order graphs is a
    # large part of this slowest test's time and does not change what is
    # compared (first_order keeps it on).
    options = tf.config.optimizer.get_experimental_options()
    tf.config.optimizer.set_experimental_options(
        {"disable_meta_optimizer": True})
    try:
      with helpers.floatx("float64"):
        self._compare(DartsSecondOrder(), tf.float64, atol=1e-9, rtol=1e-7)
    finally:
      tf.config.optimizer.set_experimental_options(
          {"disable_meta_optimizer": options.get("disable_meta_optimizer",
                                                 False)})


if __name__ == "__main__":
  tf.test.main()


def test_mirrored_evaluation_with_an_empty_replica_equals_default(tmp_path):
  # 749 search-val digits with a global batch of 4: the last batch holds one
  # example, so the second replica's share is empty.
  config = tiny_config(str(tmp_path / "a"), batch_size=4)
  single = Search(config, show_progress=False)
  assert single.data.val.num_examples % 4 == 1
  expected = single.evaluate()
  mirrored = Search(tiny_config(str(tmp_path / "b"), batch_size=4),
                    strategy=mirrored_cpu_strategy(), show_progress=False)
  got = mirrored.evaluate()
  assert 0.0 <= got["val/acc"] <= 1.0
  np.testing.assert_allclose(got["val/acc"], expected["val/acc"], atol=1e-6)
  np.testing.assert_allclose(got["val/loss"], expected["val/loss"],
                             rtol=1e-5)


@pytest.mark.parametrize("num_cells,missing", [(1, ["normal"]),
                                               (2, ["normal"]), (3, []),
                                               (8, [])])
def test_a_network_without_normal_cells_is_warned_of(num_cells, missing,
                                                      caplog):
  # Reductions sit at num_cells // 3 and 2 * num_cells // 3: with fewer than
  # 3 cells no normal cell trains, yet the genotype reports one.
  from tfnas.spaces import darts as darts_space
  from tfnas.train.search import _warn_about_space
  space = darts_space.search_space("s3", num_cells=num_cells, num_nodes=2,
                                   channels=4, num_classes=10)
  caplog.clear()
  _warn_about_space(space, "s3", 8)
  warned = [r.getMessage() for r in caplog.records
            if r.levelname == "WARNING"]
  assert len(warned) == len(missing) == len(space.warnings())
  for message, cell in zip(warned, missing):
    assert message.startswith(
        f"--space=s3: --num_cells={num_cells} has no {cell} cell")


def test_a_new_run_refuses_a_field_its_method_ignores(tmp_path):
  from tfnas.config import ConfigError
  config = SearchConfig(run_dir=str(tmp_path / "r"), dataset="digits",
                        method="dsnas", resource_weight=0.5)
  with pytest.raises(ConfigError, match=r"^--resource_weight=0.5 is read "
                                        r"only by --method=snas"):
    Search(config, show_progress=False)
  assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("small,size,warned", [(False, 8, True),
                                               (True, 8, False),
                                               (False, 32, False)])
def test_the_224_pixel_block_space_on_tiny_inputs_is_warned_of(
    small, size, warned, caplog):
  # On 8×8 digits, 15 of the 20 ImageNet-design blocks see 1×1 maps; the
  # small space (the digits flagfile's) has 2 of 5, 32×32 3 of 20.
  from tfnas.spaces import shufflenet
  from tfnas.train.search import _warn_about_space
  preset = (shufflenet.ShuffleNetSpaceConfig.small if small else
            shufflenet.ShuffleNetSpaceConfig)
  space = preset(num_classes=10, input_size=size)
  caplog.clear()
  _warn_about_space(space, "shufflenet", size)
  messages = [r.getMessage() for r in caplog.records
              if r.levelname == "WARNING"]
  if warned:
    assert messages == [
        "--space=shufflenet: on 8×8 inputs 15 of its 20 blocks get 1×1 "
        "feature maps, where the kernel-size choices hardly differ; use a "
        "space with fewer stride-2 stages (shufflenet_small, or "
        "--stage_repeats/--stage_channels) or larger inputs"]
  else:
    assert messages == []
  # The small preset itself is not offered as the way out.
  caplog.clear()
  _warn_about_space(shufflenet.ShuffleNetSpaceConfig.small(input_size=2),
                    "shufflenet_small", 2)
  assert [r.getMessage() for r in caplog.records] == [
      "--space=shufflenet_small: on 2×2 inputs 4 of its 5 blocks get 1×1 "
      "feature maps, where the kernel-size choices hardly differ; use a "
      "space with fewer stride-2 stages (--stage_repeats/--stage_channels) "
      "or larger inputs"]
  # A cell space of 3 cells or more has nothing to say.
  from tfnas.spaces import darts as darts_space
  assert darts_space.search_space(
      "s3", num_cells=3, num_nodes=2, channels=4,
      num_classes=10).warnings() == []


@pytest.mark.parametrize("num_cells,size,sizes", [
    (8, 8, [8, 8, 8, 4, 4, 4, 2, 2]),  # The digits: no warning.
    (8, 4, [4, 4, 4, 2, 2, 2, 1, 1]),
    (8, 3, [3, 3, 3, 2, 2, 2, 1, 1]),  # Halving rounds up.
    (8, 2, [2, 2, 2, 1, 1, 1, 1, 1]),
    (5, 4, [4, 4, 2, 2, 1]),
    (8, 1, [1] * 8)])
def test_cells_on_1x1_feature_maps_are_warned_of(num_cells, size, sizes,
                                                 caplog):
  from tfnas import models
  from tfnas.layers import cell
  from tfnas.spaces import darts as darts_space
  from tfnas.train.search import _warn_about_space
  space = darts_space.search_space("darts", num_cells=num_cells)
  assert cell.cell_input_sizes(num_cells, size) == sizes
  caplog.clear()
  _warn_about_space(space, "darts", size)
  messages = [r.getMessage() for r in caplog.records
              if r.levelname == "WARNING"]
  tiny = sizes.count(1)
  said = (f"on {size}×{size} inputs {tiny} of its {num_cells} cells "
          f"{'gets' if tiny == 1 else 'get'} 1×1 feature maps, where the "
          "convolutions and pools hardly differ; use larger inputs (each "
          "reduction cell halves them)")
  assert messages == ([f"--space=darts: {said}"] if tiny else [])
  # The retrained CIFAR network has the same cells.
  assert models.size_warnings("cifar", size, num_cells) == (
      [f"--network=cifar {said}"] if tiny else [])
