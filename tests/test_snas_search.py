"""SNAS through the one search loop on digits: resource effect, child eval."""

import os

import numpy as np
import pytest
import tensorflow as tf

from tfnas import cost
from tfnas import derive
from tfnas import methods
from tfnas import objectives
from tfnas.arch import EVAL_SALT
from tfnas.config import SearchConfig
from tfnas.spaces import darts as darts_space
from tfnas.train.search import Search


def snas_config(run_dir, **overrides):
  kwargs = dict(run_dir=str(run_dir), dataset="digits", method="snas",
                num_cells=3, num_nodes=2, channels=4, batch_size=32,
                epochs=2, max_steps_per_epoch=8, steps_per_loop=4,
                w_lr=0.05, arch_lr=0.05, seed=5)
  kwargs.update(overrides)
  return SearchConfig(**kwargs)


def child_params(result, space, image_size=8):
  """Analytic parameter count of the argmax child inside the supernet."""
  tables = objectives.edge_cost_tables(space, image_size)
  total = 0.0
  for name, table in tables.items():
    choice = np.argmax(result.alphas[name], axis=-1)  # Includes `none`.
    total += sum(table[:, e, k, 0].sum() for e, k in enumerate(choice))
  return total


def test_edge_cost_tables_shape_and_reduction_edges():
  space = darts_space.search_space("darts", num_cells=3, num_nodes=2,
                                   channels=4, num_classes=10)
  tables = objectives.edge_cost_tables(space, 8)
  assert tables["normal"].shape == (1, 5, 8, 3)
  assert tables["reduce"].shape == (2, 5, 8, 3)
  skip = space.candidates.index("skip_connect")
  # Input edges of a reduction cell: FactorizedReduce has parameters.
  assert tables["reduce"][0, 0, skip, 0] > 0
  assert tables["reduce"][0, 4, skip, 0] == 0  # node 3 <- node 2: identity
  combined = objectives.combine_metric(tables, "all")
  assert combined["normal"].shape == (1, 5, 8)
  assert 0 < sum(c.max(axis=-1).sum() for c in combined.values()) <= 1 + 1e-9
  # `all` (the default) averages the three normalised metrics.
  parts = [objectives.combine_metric(tables, m)
           for m in ("params", "flops", "mac")]
  for group, value in combined.items():
    np.testing.assert_allclose(value, sum(p[group] for p in parts) / 3)
  # Reduction cells double C; their input edges have stride 2 on the
  # incoming resolution, the inner edges run at the halved one (cell 1:
  # 8x8 in, 4x4 inside; cell 2: 4x4 in, 2x2 inside).
  sep = space.candidates.index("sep_conv_3x3")
  flops = lambda c, stride, hw: cost.op_cost("sep_conv_3x3", c, stride,
                                             (hw, hw)).flops
  assert tables["reduce"][0, 0, sep, 1] == flops(8, 2, 8)
  assert tables["reduce"][0, 4, sep, 1] == flops(8, 1, 4)
  assert tables["reduce"][1, 4, sep, 1] == flops(16, 1, 2)
  assert tables["normal"][0, 4, sep, 1] == flops(4, 1, 8)


def test_snas_keeps_the_argmax_child():
  # Its genotype is the argmax of every edge, `none` (dropped edges)
  # included, with no top-k pruning: not the DARTS rule.
  ops = ("none", "skip_connect", "sep_conv_3x3")
  rng = np.random.default_rng(0)
  alphas = {"normal": rng.standard_normal((5, 3)),
            "reduce": rng.standard_normal((5, 3))}
  alphas["normal"][:, 0] += 3  # `none` wins every normal edge.
  genotype = methods.get_method("snas").selector(alphas, ops, 2)
  assert genotype == derive.derive_argmax(alphas["normal"], alphas["reduce"],
                                          ops, num_nodes=2)
  assert genotype.normal.nodes == ((), ())


@pytest.mark.slow
def test_strong_resource_weight_gives_a_cheaper_child(tmp_path):
  tf.config.experimental.enable_op_determinism()
  # S3: none, skip_connect and sep_conv_3x3 differ in cost by orders.
  free = Search(snas_config(tmp_path / "free", space="s3"),
                show_progress=False).run()
  costly = Search(snas_config(tmp_path / "costly", space="s3",
                              resource_weight=20.0),
                  show_progress=False).run()
  space = darts_space.search_space("s3", num_cells=3, num_nodes=2,
                                   channels=4, num_classes=10)
  assert child_params(costly, space) < child_params(free, space)
  assert "train/resource_cost" in costly.history[-1]
  assert costly.history[-1]["train/resource_cost"] < 1.0


@pytest.mark.slow
def test_child_accuracy_close_to_search_accuracy(tmp_path):
  tf.config.experimental.enable_op_determinism()
  # S3 (none, skip_connect, sep_conv_3x3): a third of the DARTS space's time.
  result = Search(snas_config(tmp_path / "run", space="s3", channels=8,
                              epochs=5, max_steps_per_epoch=20, arch_lr=0.05,
                              temperature_end=0.03),
                  show_progress=False).run()
  last = result.history[-1]
  assert last["arch/temperature"] == pytest.approx(0.03, abs=1e-6)
  # Each epoch logs the λ of its own last step (step 19 of 0..99), not the
  # next epoch's first.
  assert result.history[0]["arch/temperature"] == pytest.approx(
      1.0 + (0.03 - 1.0) * 19 / 99, abs=1e-6)
  assert last["val/acc"] > 0.6
  # SNAS Table 1: the derived child keeps the search accuracy (DARTS' child
  # loses ~33 points). Measured here: sampled 0.967, child 0.960 (in the
  # DARTS space: sampled 0.807, child 0.903, the child being the mode of a
  # not yet converged p(Z)).
  assert last["val/child_acc"] >= last["val/acc"] - 0.05
  assert abs(last["val/child_acc"] - last["val/acc"]) < 0.15
  assert os.path.exists(tmp_path / "run" / "genotype.json")


def test_sampled_supernet_is_evaluated_at_the_logged_temperature(tmp_path):
  # val/acc of SNAS scores a relaxed sample at λ of the last training step,
  # the λ that arch/temperature logs (not the next step's), drawn with noise
  # apart from the training steps' (not the last step's own Z).
  search = Search(snas_config(tmp_path / "run", epochs=2,
                              max_steps_per_epoch=3),
                  show_progress=False)
  distribution = search.ctx.distribution
  sample, seen = distribution.sample, []

  def spy(arch, step=None, salt=0):
    tf.py_function(lambda s: seen.append((int(s), salt)), [step], [])
    return sample(arch, step, salt)

  distribution.sample = spy
  history = search.run().history
  assert search.w_opt.iterations.numpy() == 6
  # One sample per validation batch, after steps 0-2 and 3-5.
  assert seen and sorted(set(seen)) == [(2, EVAL_SALT), (5, EVAL_SALT)]
  temperature = distribution.temperature
  assert abs(float(temperature(2)) - float(temperature(3))) > 0.1
  assert history[0]["arch/temperature"] == pytest.approx(
      float(temperature(2)), abs=1e-7)
