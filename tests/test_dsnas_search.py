"""DSNAS through the one search loop: both spaces, early stop, resume, CLI."""

import json
import os
import re
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from tfnas import child as child_lib
from tfnas import distribute
from tfnas import flags as tfnas_flags
from tfnas import methods
from tfnas.block_genotype import BlockGenotype
from tfnas.config import ConfigError, SearchConfig
from tfnas.errors import TfnasError
from tfnas.distribute import mirrored_strategy
from tfnas.genotype import Genotype
from tfnas.layers.batch_norm import BatchNorm
from tfnas.spaces import names
from tfnas.spaces import registry
from tfnas.train.search import Search

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dsnas_config(run_dir, **overrides):
  kwargs = dict(run_dir=str(run_dir), dataset="digits", method="dsnas",
                space="shufflenet_small", batch_size=32, epochs=2,
                max_steps_per_epoch=4, steps_per_loop=2, w_lr=0.05,
                arch_lr=0.2, arch_init_scale=0.0, seed=2,
                early_stop_threshold=0.05)
  kwargs.update(overrides)
  return SearchConfig(**kwargs)


def test_flag_enums_match_the_registries():
  assert sorted(tfnas_flags.METHODS) == sorted(methods.METHODS)
  assert tfnas_flags.SPACES == names.SPACES


def test_method_refuses_a_space_kind_it_cannot_search(tmp_path):
  config = dsnas_config(tmp_path / "r", method="darts_1st",
                        early_stop_threshold=0.3)  # DSNAS's flag: default.
  with pytest.raises(TfnasError, match="cannot search the blocks space"):
    Search(config, show_progress=False)


@pytest.mark.parametrize("sync", [True, False])
def test_sync_batch_norm_reaches_every_batch_norm_of_both_space_kinds(
    tmp_path, sync):
  cells = dsnas_config(tmp_path / "c", space="s3", num_cells=2, num_nodes=1,
                       channels=4, sync_batch_norm=sync)
  blocks = dsnas_config(tmp_path / "b", stage_channels=(8, 16, 32, 64),
                        stem_channels=4, head_channels=16,
                        sync_batch_norm=sync)
  for config in (cells, blocks):
    space = registry.space_config(config, 10, 8)
    assert space.sync_batch_norm is sync
    net = registry.build_network(space, (8, 8, 1))
    bns = [layer for layer in net._flatten_layers()
           if isinstance(layer, BatchNorm)]
    assert len(bns) > 5
    assert [layer.synchronized for layer in bns] == [sync] * len(bns)


def test_imagenet_recipe_options_reach_the_weight_optimizer(tmp_path):
  """--exclude_bn_from_weight_decay skips exactly the BN scales and shifts;
  --w_lr_warmup_epochs starts the rate at w_lr / warm-up steps."""
  config = dsnas_config(tmp_path / "r", stage_channels=(8, 16, 32, 64),
                        stem_channels=4, head_channels=16, epochs=3,
                        w_weight_decay=4e-5, exclude_bn_from_weight_decay=True,
                        w_lr_warmup_epochs=1, w_lr_per_step=True)
  search = Search(config, show_progress=False)
  bn = {id(w.value) for layer in search.network._flatten_layers()
        if isinstance(layer, BatchNorm) for w in layer.trainable_weights}
  decays = {id(v.value): search.w_opt.decay_of(v)
            for v in search.network.trainable_variables}
  assert len(bn) > 10
  assert {decays[i] for i in bn} == {0.0}
  assert {d for i, d in decays.items() if i not in bn} == {4e-5}
  assert float(search.w_opt.current_lr()) == pytest.approx(0.05 / 4)
  default = Search(dsnas_config(tmp_path / "d"), show_progress=False)
  assert {default.w_opt.decay_of(v)
          for v in default.network.trainable_variables} == {3e-4}


def test_early_stop_flags_reach_the_policy(tmp_path):
  narrow = dict(stage_channels=(8, 16, 32, 64), stem_channels=4,
                head_channels=16)
  search = Search(dsnas_config(tmp_path / "l", early_stop_threshold=1.5,
                               early_stop_on_logits=True, epochs=1,
                               max_steps_per_epoch=1, **narrow),
                  show_progress=False)
  assert search.early_stop.on_logits
  assert search.early_stop.threshold == 1.5
  # Its start line says what the first steps trace (no one step graph).
  assert search.describe().endswith(
      "1 step per epoch x 1 epoch (the first children's steps also trace "
      "their ops)")
  default = Search(dsnas_config(tmp_path / "p", **narrow),
                   show_progress=False)
  assert not default.early_stop.on_logits
  assert default.early_stop.threshold == 0.05


def test_an_early_stop_interval_longer_than_the_run_is_warned_of(
    tmp_path, caplog):
  narrow = dict(stage_channels=(8, 16, 32, 64), stem_channels=4,
                head_channels=16)
  Search(dsnas_config(tmp_path / "a", early_stop_every_steps=8, **narrow),
         show_progress=False)  # 2 epochs of 4 steps: checked once.
  assert "early stop never checks" not in caplog.text
  Search(dsnas_config(tmp_path / "b", early_stop_every_steps=9, **narrow),
         show_progress=False)
  assert ("--early_stop_every_steps=9 is more than this run's 8 steps"
          in caplog.text)


def test_sync_batch_norm_refused_for_eager_cell_steps_on_local_replicas(
    tmp_path):
  # Eager single-path steps issue BN all-reduces from each local replica's
  # thread in no fixed order (WORKSPACE_NOTES.md, known gaps): refused
  # before the run directory is written. The block space is allowed.
  strategy = mirrored_strategy(["/cpu:0", "/cpu:1"])
  config = dsnas_config(tmp_path / "r", space="s3", num_cells=2, num_nodes=1,
                        channels=4, sync_batch_norm=True)
  with pytest.raises(TfnasError, match=r"--sync_batch_norm with "
                     r"--method=dsnas in the cell space --space=s3 needs one "
                     r"replica per process \(this process has 2\)"):
    Search(config, strategy=strategy, show_progress=False)
  assert not (tmp_path / "r").exists()
  assert distribute.local_replicas(strategy) == 2
  assert distribute.local_replicas(tf.distribute.get_strategy()) == 1
  # Compiled steps order every all-reduce: DARTS is allowed, and so is
  # DSNAS without synchronized BN.
  for allowed in (config.replace(method="darts_1st", early_stop_threshold=0.3,
                                 run_dir=str(tmp_path / "d")),
                  config.replace(sync_batch_norm=False,
                                 run_dir=str(tmp_path / "p"))):
    Search(allowed, strategy=strategy, show_progress=False)
  # Switched steps cannot all-reduce BN statistics from their shared edge
  # functions at all: refused with several replicas, before any writing.
  switched = config.replace(single_path_step="switch", run_dir=str(
      tmp_path / "s"))
  blocks = switched.replace(space="shufflenet_small", run_dir=str(
      tmp_path / "b"))
  for refused in (switched, blocks):
    with pytest.raises(TfnasError, match=r"--sync_batch_norm with "
                       r"--single_path_step=switch needs a single replica "
                       r"\(this run has 2\)"):
      Search(refused, strategy=strategy, show_progress=False)
  assert not (tmp_path / "s").exists()
  assert not (tmp_path / "b").exists()


def test_batch_statistics_evaluation_runs_without_dropout(tmp_path):
  # val/acc and val/child_acc use BN batch statistics (training=True) but
  # must not drop activations: they equal the same evaluation of the same
  # network whose dropout layer is a no-op.
  search = Search(dsnas_config(tmp_path / "r", space="shufflenet_small",
                               head_channels=16), show_progress=False)
  dropout = search.ctx.network.dropout
  assert dropout.rate == pytest.approx(0.1)
  got = [search.evaluate(child=c) for c in (False, True)]
  dropout.rate = 0.0
  expected = [search.evaluate(child=c) for c in (False, True)]
  for g, e in zip(got, expected):
    assert g.keys() == e.keys()
    for key in g:
      assert g[key] == pytest.approx(e[key], rel=1e-6, abs=1e-7), key
  # With dropout active the loss differs: the comparison can tell.
  dropout.rate = 0.5
  images = np.random.default_rng(0).standard_normal((8, 8, 8, 1))
  logits = [search.ctx.forward(images.astype(np.float32), None,
                               {"blocks": (0,) * 5}, training=True, dropout=d)
            for d in (True, False)]
  assert np.abs(logits[0] - logits[1]).max() > 1e-3


def test_flops_target_is_checked_against_the_space_and_normalised():
  """A budget in M multiply-adds becomes the estimator's normalised target;
  one below the cheapest child is refused with the cheapest child's FLOPs."""
  from tfnas import objectives
  from tfnas.spaces import shufflenet
  base = dict(method="dsnas", space="shufflenet_small", flops_weight=0.5,
              stage_repeats=(1, 1, 1, 1), stage_channels=(16, 24, 32, 48))

  def setup(config):
    space = registry.space_config(config, 10, 16)
    return space, methods.SearchSetup(config, space, 10, 16, channels=1)

  space, _ = setup(SearchConfig(**base))
  table = shufflenet.block_costs(space, 16)[..., 1]
  cheapest = shufflenet.network_flops(space, table.argmin(1), 16, 1)
  costliest = shufflenet.network_flops(space, table.argmax(1), 16, 1)
  budget = (cheapest + costliest) / 2e6
  config = SearchConfig(**base, flops_target=budget)
  est = methods.get_method("dsnas").estimator(setup(config)[1])
  flops = objectives.decision_flops(space, 16, in_channels=1)
  assert est.flops_target == pytest.approx(flops.normalise(budget * 1e6))
  assert 0 < est.flops_target < 1
  assert "train/over_flops_target" in est.metric_keys()
  too_low = SearchConfig(**base, flops_target=cheapest / 1e6 * 0.99)
  check = methods.get_method("dsnas").check
  with pytest.raises(TfnasError, match=r"below the cheapest child .*"
                     r"\(([0-9.]+)M at 16x16\)") as refused:
    check(setup(too_low)[1])
  # The printed bound is rounded up to 4 digits: passing it back is allowed.
  printed = float(re.search(r"\(([0-9.]+)M", str(refused.value)).group(1))
  assert printed == pytest.approx(cheapest / 1e6, rel=1e-3)
  check(setup(SearchConfig(**base, flops_target=printed))[1])


def test_printed_flops_bounds_stay_bounds():
  rng = np.random.default_rng(0)
  for x in np.concatenate([rng.uniform(0, 1, 500) * 10.0 ** rng.integers(
      -3, 4, 500), [31.310000000000002, 0.06, 1.0, 270.4]]):
    up, down = methods._rounded(x, up=True), methods._rounded(x, up=False)
    assert down <= x <= up, x
    assert up - down <= 10.0 ** (np.floor(np.log10(x)) - 3) * 1.0001, x


def test_a_refused_flops_target_leaves_no_run_directory(tmp_path):
  run_dir = tmp_path / "run"
  config = dsnas_config(run_dir, flops_weight=0.5, flops_target=1e-4)
  with pytest.raises(TfnasError, match="below the cheapest child"):
    Search(config, show_progress=False)
  assert not run_dir.exists()  # The corrected command can use it.


def test_evaluation_draws_its_child_apart_from_the_training_steps(tmp_path):
  # val/acc scores a child drawn from α with its own noise stream, not the
  # child the last training step used (nor the next one's).
  from tfnas.arch import EVAL_SALT
  search = Search(dsnas_config(tmp_path / "run"), show_progress=False)
  search.w_opt.iterations.assign(7)
  dist, arch = search.ctx.distribution, search.arch
  drawn = search._eval_indices(child=False)  # pylint: disable=protected-access
  def same(a, b):
    return all((a[g] == b[g]).all() for g in a)
  assert same(drawn, dist.sample_indices(arch, 6, salt=EVAL_SALT))
  assert not same(drawn, dist.sample_indices(arch, 6))
  assert not same(drawn, dist.sample_indices(arch, 7))


def test_only_dsnas_steps_run_eagerly():
  for name, method in methods.METHODS.items():
    config = SearchConfig(method=name)
    setup = methods.SearchSetup(config, registry.space_config(config, 10, 32),
                                10, 32)
    assert method.eager_steps is (not method.estimator(setup).compiled_step)
  assert [m for m in methods.METHODS if methods.METHODS[m].eager_steps] == [
      "dsnas"]


class DsnasSearchTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    tf.config.experimental.enable_op_determinism()

  def test_resume_keeps_fixed_decisions_and_matches_a_straight_run(self):
    base = self.get_temp_dir()
    # Narrow widths: the loop's resume is what is checked here.
    # α learns fast enough that one epoch fixes a decision (gaps after it:
    # 0.12 for one block, <= 0.08 for the others).
    narrow = dict(stage_channels=(8, 16, 32, 64), stem_channels=4,
                  head_channels=16, arch_lr=0.5, early_stop_threshold=0.1)
    straight = Search(dsnas_config(os.path.join(base, "a"), **narrow),
                      show_progress=False)
    straight_result = straight.run()
    config = dsnas_config(os.path.join(base, "b"), **narrow)
    first = Search(config, show_progress=False)
    first.run(stop_after_epochs=1)
    fixed = first.early_stop.fixed()["blocks"]
    alpha = first.arch.numpy()["blocks"]
    self.assertGreater((fixed >= 0).sum(), 0)  # Some decision was fixed.
    resumed = Search(config, resume=True, show_progress=False)
    self.assertAllEqual(resumed.early_stop.fixed()["blocks"], fixed)
    result = resumed.run()
    after = result.alphas["blocks"]
    rows = fixed >= 0
    self.assertAllEqual(after[rows], alpha[rows])  # Frozen after fixing.
    self.assertAllEqual(resumed.early_stop.fixed()["blocks"][rows],
                        fixed[rows])
    self.assertAllClose(after, straight_result.alphas["blocks"], atol=1e-6)
    self.assertEqual(str(result.genotype), str(straight_result.genotype))
    # The fixed choices are the genotype's choices there.
    choices = np.array(result.genotype.indices(
        resumed.arch.group("blocks").candidates))
    self.assertAllEqual(choices[rows], fixed[rows])
    record = json.load(open(os.path.join(config.run_dir, "arch.json")))
    self.assertEqual(record["groups"]["blocks"]["fixed"],
                     resumed.early_stop.fixed()["blocks"].tolist())
    self.assertIn("val/child_acc", result.history[-1])
    self.assertIn("arch/fixed_decisions", result.history[-1])

  def test_dsnas_in_the_darts_cell_space(self):
    config = dsnas_config(
        os.path.join(self.get_temp_dir(), "c"), space="darts", num_cells=3,
        num_nodes=2, channels=4, epochs=1, max_steps_per_epoch=3,
        early_stop_every_steps=1, reward_normalization=True,
        flops_weight=0.1, recompute=True,  # As flags/dsnas_cifar10.cfg.
        # 31K multiply-adds: above the all-`none` child's stem,
        # preprocessing and classifier (29,760), far below the costliest.
        flops_target=0.031,
        early_stop_threshold=1e-6)  # Fixes decisions at the first check.
    search = Search(config, show_progress=False)
    checked_at = []
    check = search._check_early_stop

    def counted_check():
      checked_at.append(int(search.w_opt.iterations.numpy()))
      check()
    search._check_early_stop = counted_check
    result = search.run()
    # Checked after every step, not (also) at the epoch end.
    self.assertEqual(checked_at, [1, 2, 3])
    self.assertGreater(search.early_stop.num_fixed(), 0)
    # The options are wired: reward statistics are checkpointed state, and
    # the sampled child's normalised FLOPs and whether it exceeded the budget
    # are reported.
    self.assertIs(search.checkpoint.reward_normalizer,
                  search.estimator.reward_normalizer)
    self.assertEqual(int(search.estimator.reward_normalizer.count.numpy()), 3)
    self.assertBetween(result.history[-1]["train/flops"], 0.0, 1.0)
    self.assertBetween(search.estimator.flops_target, 0.0, 1.0)
    self.assertBetween(result.history[-1]["train/over_flops_target"], 0.0, 1.0)
    self.assertIsInstance(result.genotype, Genotype)
    self.assertEqual(result.genotype.normal.num_nodes, 2)
    self.assertTrue(np.isfinite(result.history[-1]["train/loss"]))
    # Fixed after step 1, each fixed decision kept its α row in steps 2-3.
    for name, fixed in search.early_stop.fixed().items():
      rows = fixed >= 0
      frozen = search.early_stop.fixed_logits[name].numpy()
      self.assertAllEqual(result.alphas[name][rows], frozen[rows])

  def _switched_and_eager_runs(self, prefix, alpha_atol, metric_atol,
                               **overrides):
    """Searches once with eager and once with switched steps; checks that
    only the switched run traced its step, once, and that both end with the
    same weights, α and metrics. Returns the two searches."""
    runs = {}
    for mode in ("eager", "switch"):
      config = dsnas_config(
          os.path.join(self.get_temp_dir(), prefix + mode), epochs=1,
          max_steps_per_epoch=3, early_stop_threshold=0.0, flops_weight=0.1,
          single_path_step=mode, **overrides)
      search = Search(config, show_progress=False)
      runs[mode] = (search, search.run())
    (eager, eager_result), (switched, result) = runs["eager"], runs["switch"]
    self.assertIsNone(eager._switch_step)
    self.assertEqual(switched._switch_step.experimental_get_tracing_count(),
                     1)
    for a, b in zip(eager.network.variables, switched.network.variables):
      self.assertAllClose(a, b, atol=2e-5, rtol=1e-4)
    # α moves by ~0.1-0.6 in these steps; the two paths sum in different
    # orders, and how far apart they end depends on TF's thread count
    # (one intra-op thread: 1.3e-5 on an α of 0.12 in the block space).
    for name in eager_result.alphas:
      self.assertAllClose(eager_result.alphas[name], result.alphas[name],
                          atol=alpha_atol, rtol=1e-4)
    for key in ("train/loss", "train/flops", "val/acc", "val/child_acc"):
      self.assertAllClose(eager_result.history[-1][key],
                          result.history[-1][key], atol=metric_atol)
    return eager, switched

  def test_switched_steps_equal_eager_steps_in_the_cell_space(self):
    """--single_path_step=switch: every step's child runs through one
    traced graph, with the eager path's results."""
    self._switched_and_eager_runs(
        "c", alpha_atol=1e-6, metric_atol=1e-5, space="darts", num_cells=3,
        num_nodes=2, channels=4, reward_normalization=True)

  def test_switched_steps_equal_eager_steps_in_the_block_space(self):
    """The same in the ShuffleNet space (three blocks: stride 2, 2, 1),
    with the FLOPs penalty and the evaluations."""
    _, switched = self._switched_and_eager_runs(
        "b", alpha_atol=1e-5, metric_atol=1e-4, stage_repeats=(1, 2),
        stage_channels=(8, 16), stem_channels=4, head_channels=16)
    self.assertLen(switched.network.blocks, 3)

  def test_compiled_child_steps_equal_eager_steps(self):
    """Once every decision is fixed, steps and evaluations run as one traced
    graph of the child, with the eager path's results."""
    searches = {}
    original = Search._compiled_child_step
    for limit in (0, 1):
      config = dsnas_config(
          os.path.join(self.get_temp_dir(), f"compiled{limit}"), epochs=1,
          max_steps_per_epoch=4, compiled_children=limit,
          early_stop_every_steps=1,
          # Random α: every decision has a gap, all fixed after step 1.
          arch_init_scale=1e-3, early_stop_threshold=1e-6,
          reward_normalization=True)
      compiled_steps = []

      def counted(self, step, compiled_steps=compiled_steps):
        run = original(self, step)
        compiled_steps.append(run is not None)
        return run
      with mock.patch.object(Search, "_compiled_child_step", counted):
        search = Search(config, show_progress=False)
      searches[limit] = (search, search.run(), compiled_steps)
    (eager, eager_result, eager_steps), (compiled, result, steps) = (
        searches[0], searches[1])
    self.assertEqual(eager_steps, [False] * 4)
    self.assertEqual(steps, [False, True, True, True])
    fixed = tuple(compiled.early_stop.fixed()["blocks"])
    self.assertNotIn(-1, fixed)
    children = compiled._children
    self.assertEqual(list(children.cached("step")), [(("blocks", fixed),)])
    self.assertEqual(list(children.cached("eval")), [(("blocks", fixed),)])
    (traced,) = children.cached("step").values()
    self.assertEqual(traced.experimental_get_tracing_count(), 1)
    self.assertEqual(eager._children.cached("step"), {})
    self.assertEqual(tuple(eager.early_stop.fixed()["blocks"]), fixed)
    for a, b in zip(eager.network.trainable_variables,
                    compiled.network.trainable_variables):
      self.assertAllClose(a, b, atol=1e-5)
    self.assertAllClose(eager_result.alphas["blocks"], result.alphas["blocks"])
    self.assertEqual(
        int(compiled.estimator.reward_normalizer.count.numpy()), 4)
    for key in ("train/loss", "val/acc", "val/child_acc"):
      self.assertAllClose(eager_result.history[-1][key],
                          result.history[-1][key], atol=1e-5)


def search_cli(*args, timeout=600, log_level="3"):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=log_level,
             CUDA_VISIBLE_DEVICES="")
  if log_level is None:  # The app's own default.
    del env["TF_CPP_MIN_LOG_LEVEL"]
  return subprocess.run(
      [sys.executable, "-m", "tfnas.apps.search", *args], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_cli_digits_flagfile_few_steps(tmp_path):
  run_dir = tmp_path / "run"
  proc = search_cli("--flagfile=flags/dsnas_digits.cfg", "--epochs=1",
                    "--max_steps_per_epoch=3", "--steps_per_loop=3",
                    "--noprogress", f"--run_dir={run_dir}", log_level=None)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Native notices (oneDNN's on TFP's int64 transpose when sampling, CUDA
  # probing) are not shown with the app's default log level.
  for native in ("oneDNN", "cuInit", "E0000"):
    assert native not in proc.stderr, proc.stderr[-3000:]
  genotype = BlockGenotype.load(run_dir / "genotype.json")
  assert len(genotype.blocks) == 5
  assert "BlockGenotype" in proc.stdout
  events = event_accumulator.EventAccumulator(
      str(run_dir / "tb"), size_guidance={"tensors": 0})
  events.Reload()
  tags = set(events.Tags()["tensors"])
  for tag in ("train/loss", "val/child_acc", "arch/blocks/block_0/fixed",
              "arch/blocks/fixed", "arch/fixed", "arch/fixed_decisions",
              "arch/blocks/block_4/choice_x"):
    assert tag in tags, (tag, sorted(tags)[:30])


@pytest.mark.slow
def test_digits_search_child_exports_and_reloads(tmp_path):
  """Search → inherited-weight child → SavedModel → reload, on digits."""
  from tfnas import child as child_lib
  from tfnas import data as data_lib
  from tfnas.arch import argmax_indices
  run_dir = tmp_path / "run"
  config = dsnas_config(run_dir, epochs=1, max_steps_per_epoch=3)
  search = Search(config, show_progress=False)
  search.run()
  images, _ = data_lib.load_split("digits", "test")
  info = data_lib.dataset_info("digits")
  x = next(iter(data_lib.make_dataset(images[:16], np.zeros(16, np.int64),
                                      info, batch_size=16,
                                      training=False)))[0]
  child, genotype, cost = child_lib.load_search_child(str(run_dir))
  assert genotype == search.genotype()
  indices = argmax_indices(search.arch)
  expected = search.network(x, arch_indices={
      g: tuple(int(i) for i in v) for g, v in indices.items()},
      training=False)
  np.testing.assert_allclose(child(x, training=False), expected, atol=1e-5)
  assert cost["params"] < sum(int(np.prod(v.shape))
                              for v in search.network.trainable_variables)
  recalibrated, _, _ = child_lib.load_search_child(str(run_dir),
                                                   recalibrate_batches=2)
  module = tf.Module()
  module.child = recalibrated  # Tracks its variables for the SavedModel.
  module.serve = tf.function(
      lambda images: {"logits": recalibrated(images, training=False)},
      input_signature=[tf.TensorSpec([None, 8, 8, 1], tf.float32)])
  tf.saved_model.save(module, str(tmp_path / "export"),
                      signatures={"serving_default": module.serve})
  loaded = tf.saved_model.load(str(tmp_path / "export"))
  out = loaded.signatures["serving_default"](images=x)["logits"]
  np.testing.assert_allclose(out, recalibrated(x, training=False), atol=1e-5)



def test_shufflenet_shape_reaches_the_search_resume_and_child(tmp_path):
  shape = dict(stage_repeats=(1, 2), stage_channels=(8, 16), stem_channels=4,
               head_channels=24)
  config = dsnas_config(tmp_path / "r", epochs=1, max_steps_per_epoch=1,
                        **shape)
  search = Search(config, show_progress=False)
  assert search.space.blocks() == ((4, 8, 2), (8, 16, 2), (16, 16, 1))
  assert search.space.head_channels == 24
  assert search.arch.numpy()["blocks"].shape[0] == 3
  search.run()
  # config.json holds lists; resuming with the same tuples is the same run.
  resumed = Search(config.replace(epochs=2), resume=True, show_progress=False)
  assert len(resumed.run().genotype.blocks) == 3
  child, genotype, _ = child_lib.load_search_child(str(config.run_dir))
  assert len(genotype.blocks) == 3
  kernels = [w.shape for w in child.trainable_weights if len(w.shape) == 2]
  assert kernels[-1] == (24, 10)  # Head width -> the classifier.


def test_shufflenet_shape_errors_name_the_flags(tmp_path):
  with pytest.raises(ConfigError, match="--stage_repeats shapes the "
                     "ShuffleNet spaces"):
    dsnas_config(tmp_path / "r", space="darts", stage_repeats=(1, 1))
  with pytest.raises(ConfigError, match="stem_channels"):
    dsnas_config(tmp_path / "r", stem_channels=-1)
  config = dsnas_config(tmp_path / "r", stage_channels=(16, 33, 64, 128))
  with pytest.raises(ConfigError, match=r"--space=shufflenet_small "
                     r"--stage_channels=16,33,64,128: stage_channels\[1\] = "
                     r"33 must be even"):
    Search(config, show_progress=False)
  assert not (tmp_path / "r").exists()  # Refused before the run dir.
