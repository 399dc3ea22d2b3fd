r"""Benchmarks trace time, step time and peak memory of the DARTS supernet.

Each measurement runs in its own subprocess so that its peak resident memory
(``VmHWM``) is its own, not the maximum over everything measured before it.

Measurements:
  fwd_bwd: one forward + backward of the supernet (∇w and ∇α, no update).
  arch_pass: the α half of a 1st-order step (forward + ∇α only, no update).
  first_order: one full DARTS 1st-order step (α step on the val batch, then
    the w step on the train batch), as the search loop runs it: one
    tf.function per phase (``DartsFirstOrder().phases()``), or the whole
    ``step`` in one with ``--one_function``.
  second_order: one full DARTS 2nd-order (unrolled) step, likewise.

For each: ``trace s`` is building the tf.function graph in Python
(``get_concrete_function``), ``first s`` the first execution (graph
optimisation + first run), ``s/step`` the median of ``--steps`` steps after
one more warm-up step.

Examples (run from the repository root; CPU only):
  # The DARTS setting (C=16, 8 cells, batch 64, 32x32): several minutes each.
  python tools/bench_search_step.py
  python tools/bench_search_step.py --recompute --only=first_order
  # The same with some of TF's graph optimisers (grappler) switched off.
  python tools/bench_search_step.py --recompute --only=first_order \
      --grappler_off=constant_folding,layout_optimizer
  # A smoke run on a tiny network (seconds).
  python tools/bench_search_step.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import time

import _bench_util as util

MEASUREMENTS = ("fwd_bwd", "arch_pass", "first_order", "second_order")


# The on/off keys of tf.config.optimizer.set_experimental_options.
GRAPPLER_OPTIMIZERS = (
    "layout_optimizer", "constant_folding", "shape_optimization",
    "remapping", "arithmetic_optimization", "dependency_optimization",
    "loop_optimization", "function_optimization", "debug_stripper",
    "scoped_allocator_optimization", "pin_to_host_optimization",
    "implementation_selector", "auto_mixed_precision",
    "auto_mixed_precision_onednn_bfloat16", "auto_mixed_precision_mkl",
    "use_plugin_optimizers")


def _parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--channels", type=int, default=16)
  p.add_argument("--cells", type=int, default=8)
  p.add_argument("--nodes", type=int, default=4)
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--num_classes", type=int, default=10)
  p.add_argument("--steps", type=int, default=3,
                 help="timed steps after warm-up (median reported)")
  p.add_argument("--jit", action="store_true",
                 help="XLA-compile the step (jit_compile=True)")
  p.add_argument("--recompute", action="store_true",
                 help="recompute cell activations in backprop (less memory)")
  p.add_argument("--recompute_unit", default="edge", choices=("edge", "cell"),
                 help="with --recompute: per mixed edge or per cell")
  p.add_argument("--no_shared_functions", action="store_true",
                 help="trace every edge inline (the pre-sharing behaviour)")
  p.add_argument("--inter_op_threads", type=int, default=0,
                 help="tf.config inter-op threads (0: TensorFlow's default)")
  p.add_argument("--intra_op_threads", type=int, default=0,
                 help="tf.config intra-op threads (0: TensorFlow's default)")
  p.add_argument("--no_grappler", action="store_true",
                 help="disable TF's graph optimiser (grappler meta-optimizer)")
  p.add_argument("--grappler_off", default="",
                 help="comma-separated grappler optimizers to switch off "
                      "(tf.config.optimizer.set_experimental_options keys, "
                      "e.g. layout_optimizer,remapping)")
  p.add_argument("--one_function", action="store_true",
                 help="first_order/second_order: the whole step as one "
                      "tf.function (the loop compiles each phase apart)")
  p.add_argument("--only", default=",".join(MEASUREMENTS),
                 help=f"comma-separated subset of {MEASUREMENTS}")
  p.add_argument("--quick", action="store_true",
                 help="tiny config for a smoke run (overrides sizes)")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.quick:
    args.batch_size, args.channels, args.cells = 4, 4, 3
    args.nodes, args.image_size, args.steps = 2, 8, 2
  only = util.select_measurements(p, args.only, MEASUREMENTS)
  util.check_counts(
      p, args, positive=("batch_size", "channels", "cells", "nodes",
                         "image_size", "num_classes", "steps"),
      non_negative=("intra_op_threads", "inter_op_threads"))
  unknown = [k for k in args.grappler_off.split(",")
             if k and k not in GRAPPLER_OPTIMIZERS]
  if unknown:
    p.error(f"--grappler_off: unknown optimizer(s) {unknown}; choose from "
            f"{GRAPPLER_OPTIMIZERS}")
  args.only = only
  return args


def _measure(args, which: str) -> dict:
  """Runs one measurement in this process and returns its numbers."""
  import numpy as np
  import tensorflow as tf

  if args.no_grappler:
    tf.config.optimizer.set_experimental_options(
        {"disable_meta_optimizer": True})
  off = [o for o in args.grappler_off.split(",") if o]
  if off:
    tf.config.optimizer.set_experimental_options({o: False for o in off})
  from tfnas.apps import startup
  startup.import_tensorflow(
      threads=(args.intra_op_threads, args.inter_op_threads))

  from tfnas.arch import ArchParams, SoftmaxDistribution
  from tfnas.estimators.darts import DartsFirstOrder, DartsSecondOrder
  from tfnas.spaces import darts as darts_space
  from tfnas.train import optim
  from tfnas.train.step import StepContext

  options = dict(num_nodes=args.nodes, num_cells=args.cells,
                 channels=args.channels, num_classes=args.num_classes,
                 recompute=args.recompute)
  if args.recompute:
    options["recompute_unit"] = args.recompute_unit
  # Older trees (the baseline) have no shared_functions field.
  if args.no_shared_functions:
    options["shared_functions"] = False
  space = darts_space.DartsSpaceConfig(**options)
  shape = (args.image_size, args.image_size, 3)
  net = darts_space.build_search_network(space, shape)
  arch = ArchParams(space.decision_groups(), init_scale=1e-3, seed=0)
  w_opt = optim.SGD(0.025, momentum=0.9, weight_decay=3e-4, clip_norm=5.0)
  w_opt.build(net.trainable_variables)
  a_opt = optim.Adam(3e-4, beta_1=0.5, beta_2=0.999, weight_decay=1e-3)
  a_opt.build(arch.variables_list)
  ctx = StepContext(net, arch, SoftmaxDistribution(), w_opt, a_opt,
                    args.batch_size)

  rng = np.random.default_rng(0)
  def batch():
    images = rng.standard_normal((args.batch_size, *shape)).astype(np.float32)
    labels = rng.integers(0, args.num_classes, args.batch_size)
    return tf.constant(images), tf.constant(labels.astype(np.int32))
  train, val = batch(), batch()
  step = tf.constant(0, tf.int64)

  if which == "fwd_bwd":
    def fn(train, val, step):
      del val, step
      images, labels = train
      with tf.GradientTape() as tape:
        weights = ctx.distribution.sample(ctx.arch)
        loss = ctx.loss(ctx.forward(images, weights, training=True), labels)
      grads = ctx.gradients(tape, loss,
                            ctx.weight_variables + ctx.arch_variables)
      return loss, tf.add_n([tf.reduce_sum(g) for g in grads])
  elif which == "arch_pass":
    def fn(train, val, step):
      del train
      grads, loss, _ = DartsFirstOrder().arch_gradient(ctx, None, val, step)
      return loss, tf.add_n([tf.reduce_sum(g) for g in grads])
  else:
    estimator = (DartsFirstOrder() if which == "first_order"
                 else DartsSecondOrder())
    # As the search loop runs it: one tf.function per phase (α step, then
    # w step), unless --one_function.
    estimator.build(ctx)
    phases = [estimator.step] if args.one_function else estimator.phases()

  if which in ("fwd_bwd", "arch_pass"):
    phases = [fn]
  else:
    phases = [lambda train, val, step, p=p: p(ctx, train, val, step)
              for p in phases]
  # Traced as written, as the search loop's phases are (no autograph).
  fns = [tf.function(p, jit_compile=args.jit or None, autograph=False)
         for p in phases]
  def run():
    for f in fns:
      tf.nest.map_structure(lambda t: t.numpy(), f(train, val, step))
  # Each phase is traced, then each runs for the first time, in order (as
  # the loop does): the first run of each is TF's one-time graph
  # optimisation of that phase.
  start = time.perf_counter()
  num_ops = sum(len(f.get_concrete_function(train, val, step).graph
                    .get_operations()) for f in fns)
  trace_s = time.perf_counter() - start
  start = time.perf_counter()
  run()
  first_s = time.perf_counter() - start
  run()  # One more warm-up (allocator, thread pools).
  # The first execution's peak includes TF's one-time graph optimisation;
  # the steps' own peak is measured from here.
  build_peak = util.peak_rss_gib()
  reset = util.reset_peak_rss()
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return {"measurement": which, "trace_s": trace_s, "first_s": first_s,
          "step_s": statistics.median(times), "peak_gib": build_peak,
          "step_peak_gib": util.peak_rss_gib() if reset else float("nan"),
          "graph_ops": num_ops}


def main(argv=None):
  args = _parse_args(argv)
  if args.child:
    util.child_main(lambda which: _measure(args, which), args.only[0])
    return
  config = (f"batch {args.batch_size}, C={args.channels}, {args.cells} cells, "
            f"{args.nodes} nodes, {args.image_size}x{args.image_size}, "
            f"jit={args.jit}, recompute={args.recompute}"
            f"{'/' + args.recompute_unit if args.recompute else ''}, "
            f"threads inter/intra={args.inter_op_threads}/"
            f"{args.intra_op_threads} (0: default), "
            f"shared_functions={not args.no_shared_functions}, "
            f"one_function={args.one_function}")
  print(f"# {config}\n")
  _, failed = util.run_rows(__file__, argv, args.only, [
      ("measurement", "measurement", ""), ("trace s", "trace_s", ".1f"),
      ("first s", "first_s", ".1f"), ("s/step", "step_s", ".2f"),
      ("peak GiB", "peak_gib", ".2f"),
      ("step peak GiB", "step_peak_gib", ".2f"),
      ("graph ops", "graph_ops", "")])
  raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
  main()
