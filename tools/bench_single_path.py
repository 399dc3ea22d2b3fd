r"""Benchmarks single-path DSNAS steps against whole-supernet steps.

Each measurement runs in its own subprocess so that its peak resident memory
(``VmHWM``) is its own.

Measurements (DARTS cell space, then the ShuffleNetV2 space):
  snas_darts: one SNAS step (relaxed one-hot Z, every op of every edge runs),
    compiled as one tf.function — the whole supernet.
  dsnas_darts: one DSNAS step (one op per edge), run eagerly with the chosen
    ops as shared traced functions — the library's DSNAS path. Every timed
    step draws a NEW child (step seeds differ), as in a search.
  dsnas_switch_darts: the same DSNAS step with ``--single_path_step=switch``:
    ONE tf.function serves every child (each edge picks its op at run time,
    `tfnas.layers.switch_path`, and backpropagates from the tensors it kept,
    or with ``--recompute`` runs the op again); a new child every step,
    passed as tensors (``trace s`` / ``first s`` are paid once per search).
  child_traced_darts: the rejected alternative, one tf.function per child:
    ``trace s`` + ``first s`` is what every new child would cost; ``s/step``
    repeats the same child.
  switch_vs_child_darts: what switching costs. For each of ``--children``
    drawn children, that child's whole step (weights and α) traced as one
    graph, as child_traced_darts does, and the switched step
    (dsnas_switch_darts) on the same child, ``--steps`` steps each; the
    per-child times and ratios are printed below the table. ``s/step`` is
    the switched step's mean over the children; ``trace s`` / ``first s``
    sum the one-graph children's; ``peak GiB`` holds both forms.
  child_per_op_darts: the bound on any single-path DSNAS step in this space.
    For each candidate op k, the weight step (forward, backward, SGD update;
    no α update) of the child with op k on every edge is traced as one
    tf.function and timed; ``s/step`` is the mean over k. That step's time is
    a sum of per-edge costs plus the work every child shares (stem,
    preprocessing, classifier, update), so by linearity the mean is the
    expected weight step of a uniformly drawn child run as one optimised
    graph with no per-call overhead. ``trace s`` / ``first s`` are summed
    over the children; the per-op times are printed below the table.
  supernet_shufflenet: forward + backward of the ShuffleNet supernet in
    mixed mode (all four candidates of every block), compiled.
  dsnas_shufflenet: one DSNAS step in the ShuffleNet space (eager, shared
    traced candidates, a new child per step).
  dsnas_switch_shufflenet: the same step switched (``--single_path_step=
    switch``): one tf.function for every child, each block picking its
    candidate at run time.

Columns: ``trace s`` (building the graph; eager rows: 0), ``first s`` (first
execution; eager rows: the first step, which traces the shared functions it
needs), ``s/step`` (median of ``--steps`` steps after warm-up: one step for
compiled rows, ``--warmup`` steps for eager rows, whose first steps with new
children still trace shared functions and build their backward functions),
``base GiB`` (resident memory once the network is built, before any step),
``peak GiB`` (peak resident memory), ``fns / ops`` (shared functions traced /
graph ops).

``--split`` also times the parts of a step as the DSNAS paper's Table 4 does
(forward, backward, optimizer) for snas_darts, dsnas_darts and
child_per_op_darts: ``forward`` is the training-mode forward pass (eager rows:
recorded on a tape, as in a step), ``backward`` is forward+backward minus
forward, ``opt`` is the whole step minus forward+backward (child_per_op_darts:
the weight update only, as its step has no α update). Compiled rows trace each
part as its own tf.function; eager rows time the parts on the same children.

Examples (run from the repository root; CPU only):
  # DARTS C=16, 8 cells, batch 64, 32x32; ShuffleNet full widths at 64x64.
  python tools/bench_single_path.py
  python tools/bench_single_path.py --only=dsnas_darts,dsnas_shufflenet
  # The switched DSNAS step (one graph for every child) against SNAS.
  python tools/bench_single_path.py --only=snas_darts,dsnas_switch_darts
  # The same, three rounds in alternation: ratios per round and median.
  python tools/bench_single_path.py --only=snas_darts,dsnas_switch_darts \
      --rounds=3 --steps=20 --warmup=6
  # DSNAS with each edge's activations recomputed in backprop (memory).
  python tools/bench_single_path.py --recompute --only=dsnas_darts
  # Forward / backward / optimizer times, as in the DSNAS paper's Table 4.
  python tools/bench_single_path.py --split --recompute \
      --only=snas_darts,dsnas_darts,child_per_op_darts
  # What switching costs: the same children as one graph each / switched.
  python tools/bench_single_path.py --only=switch_vs_child_darts \
      --children=4 --steps=5
  # A smoke run on tiny networks (seconds).
  python tools/bench_single_path.py --quick
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import _bench_util as util

MEASUREMENTS = ("snas_darts", "dsnas_darts", "dsnas_switch_darts",
                "child_traced_darts", "switch_vs_child_darts",
                "child_per_op_darts", "supernet_shufflenet",
                "dsnas_shufflenet", "dsnas_switch_shufflenet")


def _parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--channels", type=int, default=16)
  p.add_argument("--cells", type=int, default=8)
  p.add_argument("--nodes", type=int, default=4)
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--shufflenet", choices=("full", "small"), default="full",
                 help="ShuffleNet space: full (20 blocks, paper widths) or "
                      "the 5-block small preset")
  p.add_argument("--shufflenet_image_size", type=int, default=64)
  p.add_argument("--steps", type=int, default=5,
                 help="timed steps after warm-up (median reported)")
  p.add_argument("--warmup", type=int, default=10,
                 help="warm-up steps of the eager rows (new children)")
  p.add_argument("--children", type=int, default=4,
                 help="switch_vs_child_darts: children compared")
  p.add_argument("--recompute", action="store_true",
                 help="single-path DARTS rows (dsnas_darts, "
                      "dsnas_switch_darts, child_traced_darts, "
                      "switch_vs_child_darts, "
                      "child_per_op_darts): recompute each chosen edge's "
                      "activations in backprop (the snas_darts row is "
                      "unchanged)")
  p.add_argument("--split", action="store_true",
                 help="also time forward, backward and optimizer apart "
                      "(snas_darts, dsnas_darts, child_per_op_darts)")
  p.add_argument("--rounds", type=int, default=1,
                 help="measure the selected rows this many times, "
                      "alternating (A, B, A, B, ...); speed-ups are then "
                      "also given per round and as their median: this "
                      "machine's speed drifts by ~10%% over minutes, and "
                      "rows of the same round share the drift")
  p.add_argument("--intra_op_threads", type=int, default=0,
                 help="threads one TF op may use, every row (0: TF's "
                      "default, one per core)")
  p.add_argument("--inter_op_threads", type=int, default=0,
                 help="TF ops run at once, every row (0: TF's default)")
  p.add_argument("--only", default=",".join(MEASUREMENTS),
                 help=f"comma-separated subset of {MEASUREMENTS}")
  p.add_argument("--quick", action="store_true",
                 help="tiny configs for a smoke run (overrides sizes)")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.quick:
    args.batch_size, args.channels, args.cells = 4, 4, 3
    args.nodes, args.image_size, args.steps = 2, 8, 2
    args.warmup = 2
    args.shufflenet, args.shufflenet_image_size = "small", 8
  only = util.select_measurements(p, args.only, MEASUREMENTS)
  util.check_counts(
      p, args, positive=("batch_size", "channels", "cells", "nodes",
                         "image_size", "shufflenet_image_size", "steps",
                         "rounds", "children"),
      non_negative=("warmup", "intra_op_threads", "inter_op_threads"))
  args.only = only
  return args


def _context(args, kind: str, distribution, kind_is_supernet=False):
  import tensorflow as tf  # pylint: disable=unused-import
  from tfnas.arch import ArchParams
  from tfnas.spaces import darts as darts_space
  from tfnas.spaces import shufflenet
  from tfnas.train import optim
  from tfnas.train.step import StepContext
  if kind == "darts":
    space = darts_space.DartsSpaceConfig(
        num_nodes=args.nodes, num_cells=args.cells, channels=args.channels,
        num_classes=10,
        recompute=args.recompute and not kind_is_supernet)
    shape = (args.image_size, args.image_size, 3)
    net = darts_space.build_search_network(space, shape)
  else:
    size = args.shufflenet_image_size
    space = (shufflenet.ShuffleNetSpaceConfig(input_size=size)
             if args.shufflenet == "full" else
             shufflenet.ShuffleNetSpaceConfig.small(input_size=size))
    shape = (size, size, 3)
    net = shufflenet.build_shufflenet_supernet(space, shape)
  arch = ArchParams(space.decision_groups(), init_scale=1e-3, seed=0)
  w_opt = optim.SGD(0.025, momentum=0.9, weight_decay=3e-4, clip_norm=5.0)
  w_opt.build(net.trainable_variables)
  a_opt = optim.Adam(3e-4, beta_1=0.5, beta_2=0.999)
  a_opt.build(arch.variables_list)
  ctx = StepContext(net, arch, distribution, w_opt, a_opt, args.batch_size)
  return ctx, shape, space


def _fixed_child_step(est, ctx, batch, indices, update_arch: bool):
  """The step of one fixed child (to be traced as a whole): the weight
  update, and the α update if ``update_arch``."""
  def body():
    used, w_grads, costs, gates, metrics = est.gradients(ctx, batch, indices)
    ctx.weight_optimizer.apply(w_grads, used)
    if update_arch:
      ctx.apply_arch(est.arch_gradients(ctx, gates, costs, metrics))
    return metrics
  return body


def _child_forward(est, ctx, batch, indices):
  """The training-mode forward pass of the child ``indices``, recorded on a
  tape as in a DSNAS step; returns the loss."""
  import tensorflow as tf
  with tf.GradientTape() as tape:
    return est.child_forward(ctx, batch, indices, tape)[2]


def _child_gradients(est, ctx, batch, indices):
  """Forward and backward of the child ``indices``: its weight gradients."""
  return est.gradients(ctx, batch, indices)[1]


def _switched_step(est, ctx, batch):
  """The switched DSNAS step as one tf.function for every child (traced as
  the library's step loops trace: no autograph)."""
  import tensorflow as tf
  return tf.function(lambda child: est.switch_step(ctx, batch, child),
                     autograph=False)


def _index_tensors(drawn: dict) -> dict:
  """A drawn child's choices as the switched step's int32 index tensors."""
  import tensorflow as tf
  return {g: tf.constant(v, tf.int32) for g, v in drawn.items()}


def _split(forward_s: float, fwd_bwd_s: float, step_s: float) -> dict:
  return {"forward": forward_s, "backward": fwd_bwd_s - forward_s,
          "opt": step_s - fwd_bwd_s}


def _measure(args, which: str) -> dict:
  import numpy as np
  import tensorflow as tf

  from tfnas.arch import (OneHotDistribution, RelaxedOneHotDistribution,
                          linear_temperature)
  from tfnas.estimators.dsnas import DsnasEstimator
  from tfnas.estimators.snas import SnasEstimator
  from tfnas.layers import shared_function

  kind = "darts" if which.endswith("darts") else "shufflenet"
  if which == "snas_darts":
    dist = RelaxedOneHotDistribution(linear_temperature(1.0, 0.03, 100))
  else:
    dist = OneHotDistribution(seed=0)
  ctx, shape, _ = _context(args, kind, dist,
                           kind_is_supernet=which == "snas_darts")
  num_classes = ctx.network.classifier.units
  rng = np.random.default_rng(0)
  images = tf.constant(rng.standard_normal(
      (args.batch_size, *shape)).astype(np.float32))
  labels = tf.constant(rng.integers(0, num_classes, args.batch_size)
                       .astype(np.int32))
  batch = (images, labels)
  before = shared_function.num_shared_functions()
  base_gib = util.rss_gib()

  def timed(fn, steps):
    out = []
    for s in steps:
      start = time.perf_counter()
      result = fn(s)
      tf.nest.map_structure(
          lambda t: t.numpy() if hasattr(t, "numpy") else t, result)
      out.append(time.perf_counter() - start)
    return out

  def compiled(body):
    """``(trace s, graph ops, first s, step times)`` of ``body`` traced as
    one tf.function: trace, first call, one warm-up call, timed steps.
    Traced as written, as the library's step loops trace (no autograph)."""
    fn = tf.function(body, autograph=False)
    start = time.perf_counter()
    ops = len(fn.get_concrete_function().graph.get_operations())
    trace = time.perf_counter() - start
    first = timed(lambda s: fn(), [0])[0]
    fn()
    return trace, ops, first, timed(lambda s: fn(), range(args.steps))

  trace_s, count, split = 0.0, None, None
  if which == "child_per_op_darts":
    est = DsnasEstimator()
    drawn = est.sample(ctx, 0)
    per_op, first, parts = {}, 0.0, []
    for k, name in enumerate(ctx.network.space.candidates):
      child = {g: np.full_like(v, k) for g, v in drawn.items()}
      trace, _, first_k, times = compiled(_fixed_child_step(
          est, ctx, batch, child, update_arch=False))
      trace_s, first = trace_s + trace, first + first_k
      per_op[name] = statistics.median(times)
      if args.split:
        medians = [statistics.median(compiled(body)[3]) for body in (
            functools.partial(_child_forward, est, ctx, batch, child),
            functools.partial(_child_gradients, est, ctx, batch, child))]
        parts.append(_split(*medians, per_op[name]))
    result = {"measurement": which, "trace_s": trace_s, "first_s": first,
              "step_s": statistics.mean(per_op.values()),
              "peak_gib": util.peak_rss_gib(), "base_gib": base_gib,
              "count": f"{len(per_op)} children", "per_op": per_op}
    if parts:
      result["split"] = {key: statistics.mean(p[key] for p in parts)
                         for key in parts[0]}
    return result
  if which == "switch_vs_child_darts":
    est = DsnasEstimator()
    fn = _switched_step(est, ctx, batch)
    first, per_child = 0.0, []
    for s in range(1, 1 + args.children):
      drawn = est.sample(ctx, s)
      trace, _, first_s, whole = compiled(_fixed_child_step(
          est, ctx, batch, drawn, update_arch=True))
      trace_s, first = trace_s + trace, first + first_s
      indices = _index_tensors(drawn)
      fn(indices)  # Traces the switched step once, for every child.
      fn(indices)
      switched = timed(lambda _: fn(indices), range(args.steps))
      per_child.append((statistics.median(whole),
                        statistics.median(switched)))
    return {"measurement": which, "trace_s": trace_s, "first_s": first,
            "step_s": statistics.mean(b for _, b in per_child),
            "peak_gib": util.peak_rss_gib(), "base_gib": base_gib,
            "count": f"{len(per_child)} children", "per_child": per_child}
  if which in ("dsnas_switch_darts", "dsnas_switch_shufflenet"):
    est = DsnasEstimator()
    fn = _switched_step(est, ctx, batch)

    def child(s):  # A new child per step (the step seeds the draw).
      return _index_tensors(est.sample(ctx, s))
    start = time.perf_counter()
    count = len(fn.get_concrete_function(child(0)).graph.get_operations())
    trace_s = time.perf_counter() - start
    first = timed(lambda s: fn(child(s)), [0])[0]
    for s in range(1, 1 + args.warmup):
      fn(child(s))
    start = 1 + args.warmup
    times = timed(lambda s: fn(child(s)), range(start, start + args.steps))
    return {"measurement": which, "trace_s": trace_s, "first_s": first,
            "step_s": statistics.median(times),
            "mean_s": statistics.mean(times),
            "peak_gib": util.peak_rss_gib(), "base_gib": base_gib,
            "count": count}
  if which in ("snas_darts", "supernet_shufflenet", "child_traced_darts"):
    if which == "snas_darts":
      est = SnasEstimator()
      step0 = tf.constant(0, tf.int64)
      def body():
        return est.step(ctx, batch, None, step0)
    elif which == "supernet_shufflenet":
      k = len(ctx.network.space.choices)
      uniform = {"blocks": tf.fill([ctx.network.space.num_blocks, k], 1 / k)}
      def body():
        with tf.GradientTape() as tape:
          loss = ctx.loss(ctx.forward(images, uniform, training=True), labels)
        grads = ctx.gradients(tape, loss, ctx.weight_variables)
        return loss, tf.add_n([tf.reduce_sum(g) for g in grads])
    else:
      est = DsnasEstimator()
      # One fixed child, traced as a whole.
      body = _fixed_child_step(est, ctx, batch, est.sample(ctx, 0),
                               update_arch=True)
    trace_s, count, first, times = compiled(body)
    if args.split and which == "snas_darts":
      def forward():
        sample, _ = ctx.distribution.sample_with_log(ctx.arch, step0)
        return ctx.loss(ctx.forward(images, sample, training=True), labels)
      def fwd_bwd():
        w_grads, a_grads, _ = est.gradients(ctx, batch, step0)
        return w_grads + a_grads
      split = _split(*[statistics.median(compiled(f)[3])
                       for f in (forward, fwd_bwd)], statistics.median(times))
  else:
    est = DsnasEstimator()
    # A new child every step, as in a search (the step seeds the draw).
    first = timed(lambda s: est.step(ctx, batch, None, s), [0])[0]
    for s in range(1, 1 + args.warmup):
      est.step(ctx, batch, None, s)
    start = 1 + args.warmup
    steps = range(start, start + args.steps)
    times = timed(lambda s: est.step(ctx, batch, None, s), steps)
    count = shared_function.num_shared_functions() - before
    if args.split and which == "dsnas_darts":
      # The same children as the timed steps (the step seeds the draw).
      split = _split(
          statistics.median(timed(lambda s: _child_forward(
              est, ctx, batch, est.sample(ctx, s)), steps)),
          statistics.median(timed(lambda s: _child_gradients(
              est, ctx, batch, est.sample(ctx, s)), steps)),
          statistics.median(times))
  result = {"measurement": which, "trace_s": trace_s, "first_s": first,
            "step_s": statistics.median(times),
            "peak_gib": util.peak_rss_gib(), "base_gib": base_gib,
            "count": count}
  if split is not None:
    result["split"] = split
  return result


PAIRS = (("snas_darts", "dsnas_darts"), ("snas_darts", "dsnas_switch_darts"),
         ("snas_darts", "child_per_op_darts"),
         ("supernet_shufflenet", "dsnas_shufflenet"),
         ("supernet_shufflenet", "dsnas_switch_shufflenet"))


def _speedup(results: dict, base: str, row: str) -> float:
  """How many times faster ``row``'s step is than ``base``'s: medians, but
  the mean over children for a switched row (children differ in cost, and
  the mean is the search's step)."""
  return results[base]["step_s"] / results[row].get(
      "mean_s", results[row]["step_s"])


def _report(args, results: dict) -> None:
  """The notes below one round's table: per-op times, parts of a step,
  speed and memory ratios."""
  if "child_per_op_darts" in results:
    per_op = results["child_per_op_darts"]["per_op"]
    print("\nchild_per_op_darts, s/step of the child with one op on every "
          "edge: " + ", ".join(f"{k} {v:.3f}" for k, v in per_op.items()))
  if "switch_vs_child_darts" in results:
    pairs = results["switch_vs_child_darts"]["per_child"]
    mean = statistics.mean(b / a for a, b in pairs)
    print("\nswitch_vs_child_darts, s/step of each child as one graph / "
          "switched: " + ", ".join(f"{a:.3f} / {b:.3f} ({b / a:.2f})"
                                   for a, b in pairs)
          + f"; switched over one graph, mean {mean:.2f}")
  split = {k: r["split"] for k, r in results.items() if "split" in r}
  if split:
    print("\nParts of a step (s; the DSNAS paper's Table 4):\n\n"
          "| measurement | forward | backward | opt | fwd+bwd | step |\n"
          "|---|---|---|---|---|---|")
    for which, p in split.items():
      print(f"| {which} | {p['forward']:.3f} | {p['backward']:.3f} | "
            f"{p['opt']:.3f} | {p['forward'] + p['backward']:.3f} | "
            f"{results[which]['step_s']:.3f} |")
    for b in ("dsnas_darts", "child_per_op_darts"):
      if "snas_darts" in split and b in split:
        a, c = split["snas_darts"], split[b]
        ratios = ", ".join(
            f"{key} {a[key] / c[key]:.1f}x" for key in ("forward", "backward")
            if c[key] > 0)
        fb = ((a["forward"] + a["backward"]) / (c["forward"] + c["backward"]))
        print(f"\n{b} vs snas_darts by part: {ratios}, forward+backward "
              f"{_ratio(fb, 'faster', 'slower')}")
  for switched, base in (("dsnas_switch_darts", "snas_darts"),
                         ("dsnas_switch_shufflenet", "supernet_shufflenet")):
    if switched not in results:
      continue
    mean = results[switched]["mean_s"]
    vs = (f", {_ratio(_speedup(results, base, switched), 'faster', 'slower')}"
          f" than {base}" if base in results else "")
    print(f"\n{switched}: mean {mean:.3f} s/step over {args.steps} "
          f"children{vs}")
  for a, b in PAIRS:
    if a in results and b in results:
      speed = results[a]["step_s"] / results[b]["step_s"]
      memory = results[a]["peak_gib"] / results[b]["peak_gib"]
      step_memory = ((results[a]["peak_gib"] - results[a]["base_gib"]) /
                     (results[b]["peak_gib"] - results[b]["base_gib"]))
      print(f"\n{b} vs {a}: {_ratio(speed, 'faster', 'slower')} per step "
            f"(medians), {_ratio(memory, 'less', 'more')} peak memory "
            f"({_ratio(step_memory, 'less', 'more')} above the built "
            f"network)")


def _ratio(value: float, more: str, less: str) -> str:
  """``2.0x faster`` for 2.0; ``3.3x slower`` (not ``0.3x faster``) below 1."""
  if value >= 1 or value <= 0:
    return f"{value:.1f}x {more}"
  return f"{1 / value:.1f}x {less}"


def _report_rounds(rounds: list[dict]) -> None:
  """Each pair's speed-up and memory ratio per round, and their medians."""
  print(f"\n## Over {len(rounds)} rounds\n")
  for a, b in PAIRS:
    both = [r for r in rounds if a in r and b in r]
    if not both:
      continue
    speed = [_speedup(r, a, b) for r in both]
    memory = [r[a]["peak_gib"] / r[b]["peak_gib"] for r in both]
    print(f"{b} vs {a}: faster by "
          + ", ".join(f"{x:.2f}x" for x in speed)
          + f" (median {statistics.median(speed):.2f}x); less peak memory by "
          + ", ".join(f"{x:.2f}x" for x in memory)
          + f" (median {statistics.median(memory):.2f}x)")


def main(argv=None):
  args = _parse_args(argv)
  if args.child:
    from tfnas.apps import startup
    startup.import_tensorflow(
        threads=(args.intra_op_threads, args.inter_op_threads))
    util.child_main(lambda which: _measure(args, which), args.only[0])
    return
  print(f"# DARTS: batch {args.batch_size}, C={args.channels}, {args.cells} "
        f"cells, {args.nodes} nodes, {args.image_size}x{args.image_size}; "
        f"ShuffleNet: {args.shufflenet}, {args.shufflenet_image_size}x"
        f"{args.shufflenet_image_size}, batch {args.batch_size}; threads "
        f"intra/inter {args.intra_op_threads}/{args.inter_op_threads} "
        "(0: TF's default)\n")
  rounds, failed = [], False
  for r in range(args.rounds):
    if args.rounds > 1:
      print(f"## Round {r + 1} of {args.rounds}\n")
    results, round_failed = util.run_rows(__file__, argv, args.only, [
        ("measurement", "measurement", ""), ("trace s", "trace_s", ".1f"),
        ("first s", "first_s", ".1f"), ("s/step", "step_s", ".3f"),
        ("base GiB", "base_gib", ".2f"), ("peak GiB", "peak_gib", ".2f"),
        ("fns / ops", "count", "")])
    failed = failed or round_failed
    _report(args, results)
    rounds.append(results)
    if args.rounds > 1:
      print()
  if args.rounds > 1:
    _report_rounds(rounds)
  raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
  main()
