"""Machinery shared by the search loop and the retraining loop.

Both loops run epochs of chunks (``steps_per_loop`` steps per call of a
step loop, below), checkpoint with a ``tf.train.CheckpointManager``
(epoch and step-in-epoch included, so a resumed run continues mid-epoch),
save on SIGTERM / Ctrl-C before exiting, draw a progress bar and append one
JSON line of metrics per epoch to ``history.jsonl``. The pieces live here;
what a step computes stays with each loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from typing import Any, Callable, Mapping, Sequence

from absl import logging as log
import tensorflow as tf

from tfnas import distribute
from tfnas.errors import StopRequested
from tfnas.train import checkpointing
from tfnas.train import rundir
from tfnas.train import summaries
from tfnas.train.progress import progress_bar
from tfnas.train.step import batch_sums


def stop_requested(interrupted: list, saved: bool = False) -> StopRequested:
  """The `StopRequested` for the requests in ``interrupted`` (the list of
  `sigterm_flag`): SIGTERM when one came, as when another worker asked and
  this one got none (a scheduler's stop)."""
  if signal.SIGTERM in interrupted or not interrupted:
    return StopRequested(signal.SIGTERM, saved)
  return StopRequested(interrupted[0], saved)


@contextlib.contextmanager
def sigterm_flag(strategy: tf.distribute.Strategy | None = None):
  """Yields a list that gets an entry when SIGTERM arrives.

  The loop checks it between compiled chunks, saves a checkpoint and stops
  (a scheduler's SIGTERM then loses at most one chunk). In a multi-worker
  run of ``strategy`` Ctrl-C does the same instead of raising wherever the
  program is (a KeyboardInterrupt in one worker would leave the others in
  a collective; see `stop_agreement`). The previous handlers are restored
  on exit; outside the main thread nothing is installed.
  """
  interrupted = []
  multi_worker = strategy is not None and distribute.num_workers(strategy) > 1
  signums = (signal.SIGTERM, signal.SIGINT) if multi_worker else (
      signal.SIGTERM,)
  previous = {}
  try:
    for signum in signums:
      previous[signum] = signal.signal(
          signum, lambda signum, frame: interrupted.append(signum))
  except ValueError:  # Not the main thread.
    pass
  try:
    yield interrupted
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def run_epochs(*, strategy: tf.distribute.Strategy, epoch: tf.Variable,
               epochs: int, run_epoch: Callable[[list], dict],
               save: Callable[[], Any], agree: Callable[[bool], bool],
               writer, run_dir: str,
               stop_after_epochs: int | None = None) -> list[dict]:
  """The epochs a run has left (``epoch``: the finished count, checkpointed),
  or only ``stop_after_epochs`` of them; returns their metrics.

  ``run_epoch(interrupted)`` runs one epoch (with the list of
  `sigterm_flag`, which a stop request fills). A stop (SIGTERM, Ctrl-C)
  raises after ``save()`` unless the state was saved where it was honoured
  (`StopRequested.saved`), with a warning naming ``run_dir``.
  """
  history = []
  with sigterm_flag(strategy) as interrupted:
    try:
      while int(epoch.numpy()) < epochs:
        if stop_after_epochs is not None and len(history) >= stop_after_epochs:
          break
        history.append(run_epoch(interrupted))
        stop_after_epoch(agree, interrupted, int(epoch.numpy()) < epochs)
    except KeyboardInterrupt as e:
      if not getattr(e, "saved", False):
        save()
      writer.flush()
      log.warning("interrupted: state saved in %s; rerun with --resume to "
                  "continue", run_dir)
      raise
  return history


def evaluation_interrupts(strategy: tf.distribute.Strategy,
                          interrupted: list) -> list | None:
  """``interrupted`` for `evaluate` where a stop may end an evaluation
  between batches (one worker); None in a multi-worker run, whose workers
  stop together at the end of the epoch (`stop_after_epoch`)."""
  return interrupted if distribute.num_workers(strategy) <= 1 else None


def stop_after_epoch(agree: Callable[[bool], bool], interrupted: list,
                     more_epochs: bool) -> None:
  """After an epoch has ended and been saved: raises `StopRequested` when a
  stop was requested (by any worker: ``agree``, see `stop_agreement`) and
  epochs remain. A request that comes while the last epoch ends changes
  nothing: the run is complete."""
  if more_epochs and agree(bool(interrupted)):
    raise stop_requested(interrupted, saved=True)


def open_run(strategy: tf.distribute.Strategy, run_dir: str, resume: bool,
             prepare: Callable[[], bool]) -> tuple[bool, str]:
  """``(resuming, write_dir)`` of this process.

  The process that writes the run (see `distribute.worker_name`) calls
  ``prepare()`` (``rundir.prepare`` with the run's config: returns whether
  it resumes) and writes into ``run_dir``; the other workers of a
  multi-worker run write into a scratch directory (`rundir.worker_scratch`)
  and restore from ``run_dir``.
  """
  worker = distribute.worker_name(strategy)
  if worker is None:
    return prepare(), run_dir
  return resume, rundir.worker_scratch(run_dir, resume, worker)


def checkpoint_manager(checkpoint: tf.train.Checkpoint, run_dir: str,
                       resuming: bool, max_to_keep: int = 3,
                       restore_dir: str | None = None):
  """The run's CheckpointManager (``run_dir/ckpt``); restores when resuming,
  from the latest checkpoint in ``restore_dir/ckpt`` (default ``run_dir``:
  a non-chief worker saves into its scratch directory but restores the
  chief's checkpoint)."""
  if resuming:
    # Before the manager reads the checkpoint list: unreadable checkpoints
    # skipped here leave it (only this process's own directory is edited).
    restore_dir = restore_dir or run_dir
    latest = checkpointing.restore_latest(
        checkpoint, os.path.join(restore_dir, "ckpt"),
        forget_unreadable=restore_dir == run_dir)
    if latest is None:
      log.warning("no checkpoint in %s yet; starting from scratch",
                  restore_dir)
    else:
      log.info("resumed from %s", latest)
  return tf.train.CheckpointManager(
      checkpoint, os.path.join(run_dir, "ckpt"), max_to_keep=max_to_keep)


PARTIAL_EPOCH = "partial_epoch.json"


def drop_partial_epoch(write_dir: str) -> None:
  """Removes the record of `save_partial_epoch` once its epoch has ended."""
  try:
    os.remove(os.path.join(write_dir, PARTIAL_EPOCH))
  except FileNotFoundError:
    pass


def save_checkpoint(manager: tf.train.CheckpointManager, write_dir: str,
                    iterations: tf.Variable, epoch: tf.Variable,
                    totals: Mapping[str, float] | None = None) -> None:
  """Saves checkpoint number ``iterations`` (the steps taken); mid-epoch,
  with the metric sums of the epoch's steps so far (`save_partial_epoch`)."""
  number = int(iterations.numpy())
  manager.save(checkpoint_number=number)
  if totals is not None:
    save_partial_epoch(write_dir, number, int(epoch.numpy()), totals)


def save_partial_epoch(write_dir: str, checkpoint_number: int, epoch: int,
                       totals: Mapping[str, float]) -> None:
  """Records the metric sums of the steps an epoch has run so far, next to
  the mid-epoch checkpoint ``checkpoint_number`` (see `resumed_totals`)."""
  rundir.atomic_write(
      os.path.join(write_dir, PARTIAL_EPOCH),
      json.dumps({"checkpoint": int(checkpoint_number), "epoch": int(epoch),
                  "totals": {k: float(v) for k, v in totals.items()}}))


def resumed_totals(run_dir: str, checkpoint_number: int, epoch: int,
                   start: int) -> dict[str, float] | None:
  """The metric sums of the first ``start`` steps of ``epoch``, when a run
  resumes mid-epoch from checkpoint ``checkpoint_number``: {} when
  ``start`` is 0; None (with a warning) when they were not recorded for
  that checkpoint, so the epoch's train metrics cover only its remaining
  steps."""
  if not start:
    return {}
  try:
    with open(os.path.join(run_dir, PARTIAL_EPOCH)) as f:
      record = json.load(f)
    if (record["checkpoint"] == checkpoint_number and
        record["epoch"] == epoch):
      return {k: float(v) for k, v in record["totals"].items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    pass
  log.warning("no metric sums recorded for the first %d steps of epoch %d: "
              "its train metrics cover only the steps after them", start,
              epoch + 1)
  return None


def run_epoch(*, run_chunk: Callable[[int], Mapping[str, tf.Tensor]],
              steps: int, start: int, steps_per_loop: int,
              checkpoint_every_steps: int, step_in_epoch: tf.Variable,
              interrupted: list, save: Callable[[dict], None], desc: str,
              show_progress: bool,
              loss_keys=("train/loss_sum", "train/count"),
              agree: Callable[[bool], bool] = bool,
              totals: Mapping[str, float] | None = None) -> dict:
  """Runs the steps ``start..steps`` of one epoch in compiled chunks.

  Args:
    run_chunk: ``run_chunk(n)`` runs ``n`` steps (and writes its per-chunk
      summaries), returns the chunk's metric sums.
    steps: steps in the epoch.
    start: steps already done (resumed mid-epoch).
    steps_per_loop: steps per compiled call.
    checkpoint_every_steps: also save every N steps inside the epoch (0:
      never inside an epoch).
    step_in_epoch: variable recording progress (checkpointed).
    interrupted: the list of :func:`sigterm_flag`.
    save: ``save(totals)`` writes a mid-epoch checkpoint (and whatever else
      the loop saves), given the metric sums so far (`save_partial_epoch`).
    desc: progress-bar label.
    show_progress: draw the bar.
    loss_keys: (sum, count) keys shown as the running loss.
    agree: ``agree(stop)``: whether to stop after this chunk, given this
      process's request (`stop_agreement`: any worker's request stops all
      workers at the same chunk).
    totals: the sums of the steps before ``start`` (`resumed_totals`).

  Returns:
    The epoch's totals of every key ``run_chunk`` returns.

  Raises:
    StopRequested: after saving, when a stop was requested.
  """
  totals = dict(totals or {})
  with progress_bar(steps, initial=start, desc=desc,
                    enabled=show_progress) as bar, _ctrl_c_stops(interrupted):
    done = start
    while done < steps:
      n = min(steps_per_loop, steps - done)
      if checkpoint_every_steps:
        n = min(n, checkpoint_every_steps - done % checkpoint_every_steps)
      out = run_chunk(n)
      for k, v in out.items():
        totals[k] = totals.get(k, 0.0) + float(v)
      done += n
      step_in_epoch.assign(done)
      loss_sum, count = loss_keys
      bar.update(n, loss=totals[loss_sum] / max(totals[count], 1.0))
      stop = agree(bool(interrupted))
      if stop or (checkpoint_every_steps and
                  done % checkpoint_every_steps == 0 and done < steps):
        save(totals)
      if stop:
        raise stop_requested(interrupted, saved=True)
  return totals


@contextlib.contextmanager
def _ctrl_c_stops(interrupted: list):
  """While training chunks run, a first Ctrl-C is a stop request like
  SIGTERM (the chunk finishes, a checkpoint with its step and metric sums is
  saved); a second one raises at once. A KeyboardInterrupt surfacing right
  after a compiled chunk returned would lose the chunk's bookkeeping: its
  steps ran, but the step counter would not say so. Only where Ctrl-C has
  Python's default handler (`sigterm_flag` of a multi-worker run already
  takes it) and in the main thread."""
  if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
    yield
    return

  def request(signum, frame):
    del frame
    interrupted.append(signum)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    log.warning("Ctrl-C: stopping after this chunk of steps with a "
                "checkpoint (Ctrl-C again to stop at once)")
  try:
    signal.signal(signal.SIGINT, request)
  except ValueError:  # Not the main thread.
    yield
    return
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def stop_agreement(strategy: tf.distribute.Strategy) -> Callable[[bool], bool]:
  """``agree(stop)`` for `run_epoch`: True when any worker asks to stop.

  A scheduler's SIGTERM reaches the workers of a multi-worker run at
  different moments; a worker that stopped alone would save (a collective)
  while the others run the next chunk's all-reduces. With several workers
  the request is summed over them once per chunk, so all stop after the
  same chunk; otherwise it is the request itself.
  """
  if distribute.num_workers(strategy) <= 1:
    return bool

  @tf.function
  def requests(stop):
    return strategy.reduce(tf.distribute.ReduceOp.SUM,
                           strategy.run(lambda: stop), axis=None)

  return lambda stop: bool(requests(tf.constant(float(stop))) > 0)


def chunk_runner(train_loop, iterators: tuple, optimizer, writer):
  """``run_chunk(n)`` for `run_epoch`: ``n`` steps of ``train_loop`` (a step
  loop, below) on ``iterators``, then the chunk's ``train/lr`` (at its
  start) and mean ``train/step_loss`` to TensorBoard."""
  def run_chunk(n):
    lr = float(optimizer.current_lr())
    out = train_loop(iterators, tf.constant(n))
    summaries.write_scalars(writer, {
        "train/lr": lr,
        "train/step_loss": float(out["train/loss_sum"]) /
                           max(float(out["train/count"]), 1.0)},
        int(optimizer.iterations.numpy()))
    return out
  return run_chunk


def finish_epoch(run_dir: str, epoch: int, metrics: dict) -> dict:
  """Logs the metrics of (0-based) ``epoch`` and appends them to
  ``history.jsonl``, with ``"epoch": epoch + 1``."""
  metrics["epoch"] = epoch + 1
  log.info("epoch %d: %s", epoch + 1, ", ".join(
      f"{k}={v:.4f}" for k, v in metrics.items() if k != "epoch"))
  append_history(run_dir, metrics)
  return metrics


def append_history(run_dir: str, metrics: Mapping[str, float]) -> None:
  """Appends one JSON line of epoch metrics to ``run_dir/history.jsonl``.

  Lines of this and later epochs already there are dropped first: a run
  resumed from a checkpoint older than its last epoch (the newer ones
  could not be read) repeats those epochs, and each keeps one line, its
  latest. They go only when their epoch's new line is written.
  """
  path = os.path.join(run_dir, "history.jsonl")
  epoch = metrics.get("epoch")
  try:
    with open(path) as f:
      lines = [line for line in f if line.strip()]
  except FileNotFoundError:
    lines = []
  keep = [line for line in lines if not _logs_epoch_from(line, epoch)]
  if len(keep) == len(lines):
    with open(path, "a") as f:
      f.write(json.dumps(dict(metrics)) + "\n")
    return
  log.warning("history.jsonl: replacing the lines of epochs from %s on, "
              "which this run repeated from an older checkpoint", epoch)
  rundir.atomic_write(path, "".join(keep) + json.dumps(dict(metrics)) + "\n")


def _logs_epoch_from(line: str, epoch) -> bool:
  """Whether a history line is of ``epoch`` or later."""
  if not isinstance(epoch, int):
    return False
  try:
    logged = json.loads(line).get("epoch")
  except (ValueError, AttributeError):
    return False  # Not ours to judge: kept.
  return isinstance(logged, int) and logged >= epoch


# ------------------------------------------------------------- step loops
# A step loop is ``train_loop(iterators, num_steps) -> metric sums``: each of
# its ``num_steps`` steps takes one batch from every iterator (a ``None``
# iterator gives a ``None`` batch) and runs the replica step on them; the
# result sums each key of ``keys`` over replicas and steps.

def _next_batches(iterators: tuple) -> tuple:
  return tuple(next(it) if it is not None else None for it in iterators)


def _replica_sums(strategy, per_replica, keys) -> dict:
  return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica[k],
                             axis=None) for k in keys}


def compiled_step_loop(strategy: tf.distribute.Strategy, keys: Sequence[str],
                       replica_step: Callable[..., Mapping[str, tf.Tensor]]):
  """All steps of a chunk in one ``tf.function`` call (``tf.range`` loop).

  ``replica_step(*batches)`` runs on every replica and returns its metric
  sums (at least ``keys``).
  """
  keys = tuple(keys)

  @tf.function
  def train_loop(iterators, num_steps):
    totals = tuple(tf.constant(0.0) for _ in keys)
    for _ in tf.range(num_steps):
      per_replica = strategy.run(replica_step,
                                 args=_next_batches(iterators))
      sums = _replica_sums(strategy, per_replica, keys)
      totals = tuple(t + sums[k] for t, k in zip(totals, keys))
    return dict(zip(keys, totals))
  return train_loop


def compiled_replica_step(strategy: tf.distribute.Strategy,
                          replica_step: Callable[..., Mapping[str, tf.Tensor]]):
  """``run(batches)``: ``replica_step(*batches)`` on every replica in one
  ``tf.function``; returns every key it returns, summed over replicas.

  Batches come in as arguments: a batch of another size (a stream that
  keeps its last partial batch) must not retrace a supernet step more than
  once.
  """
  @tf.function(reduce_retracing=True)
  def run(batches):
    per_replica = strategy.run(replica_step, args=batches)
    return _replica_sums(strategy, per_replica, per_replica.keys())
  return run


def phased_step_loop(strategy: tf.distribute.Strategy, keys: Sequence[str],
                     phases: Sequence[Callable[..., Mapping[str, tf.Tensor]]]):
  """One ``tf.function`` per phase of a step, called in order every step.

  The batches are taken once per step, in Python, and passed to every phase
  (``phase(*batches)`` on every replica; a phase returns the metric sums it
  measured, the keys are summed over phases). Each phase is its own graph,
  so TF optimises and holds memory for one phase at a time.
  """
  compiled = [compiled_replica_step(strategy, p) for p in phases]

  def train_loop(iterators, num_steps):
    totals = {k: tf.constant(0.0) for k in keys}
    for _ in range(int(num_steps)):
      batches = _next_batches(iterators)
      for run in compiled:
        for k, v in run(batches).items():
          totals[k] += v
    return totals
  return train_loop


def eager_step_loop(strategy: tf.distribute.Strategy, keys: Sequence[str],
                    replica_step: Callable[..., Mapping[str, tf.Tensor]],
                    step_args: Callable[[], tuple] = tuple,
                    after_step: Callable[[], None] | None = None,
                    compiled_for: Callable[..., Callable | None] | None = None):
  """Steps run from Python without ``tf.function`` (single-path methods
  choose each step's child with Python values).

  Every step calls ``replica_step(*batches, *step_args())`` on every
  replica, then ``after_step()``; ``step_args`` is evaluated once per step,
  before the replicas run. When ``compiled_for(*step_args())`` returns a
  `compiled_replica_step` (e.g. the traced step of a child met before), the
  step runs that on the batches instead.
  """
  def train_loop(iterators, num_steps):
    totals = dict.fromkeys(keys, 0.0)
    for _ in range(int(num_steps)):
      batches = _next_batches(iterators)
      extra = tuple(step_args())
      run = compiled_for(*extra) if compiled_for is not None else None
      if run is not None:
        sums = run(batches)
      else:
        per_replica = strategy.run(replica_step, args=batches + extra)
        sums = _replica_sums(strategy, per_replica, keys)
      for k in keys:
        totals[k] += float(sums[k])
      if after_step is not None:
        after_step()
    return totals
  return train_loop


EVAL_KEYS = ("eval/loss_sum", "eval/correct", "eval/count")


def eval_metrics(loss_sum, logits, labels) -> dict[str, tf.Tensor]:
  """Per-replica sums of one evaluation batch (``EVAL_KEYS``)."""
  return batch_sums("eval", loss_sum, logits, labels)


def summed_eval_step(strategy: tf.distribute.Strategy,
                     replica_fn: Callable[[tf.Tensor, tf.Tensor],
                                          Mapping[str, tf.Tensor]]):
  """``step(batch)``: ``replica_fn`` on every replica, sums over replicas.

  ``replica_fn(images, labels)`` returns :func:`eval_metrics`. A replica
  whose share of the last, partial batch is empty returns zeros without
  running the network (some CPU kernels mis-shape zero-size batches).
  """
  def guarded(images, labels):
    def empty():
      return {k: tf.constant(0.0) for k in EVAL_KEYS}
    if tf.executing_eagerly():
      if int(tf.shape(labels)[0]) == 0:
        return empty()
      return replica_fn(images, labels)
    return tf.cond(tf.shape(labels)[0] > 0,
                   lambda: replica_fn(images, labels), empty)

  def step(batch):
    per_replica = strategy.run(guarded, args=batch)
    return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
            for k, v in per_replica.items()}
  return step


def evaluate(dataset, step, prefix: str = "val/", show_progress: bool = False,
             batches: int | None = None,
             interrupted: list | None = None) -> dict[str, float]:
  """Runs ``step`` over a (distributed) dataset; mean loss and accuracy.

  ``show_progress`` draws a bar over the ``batches`` (None: counted) that is
  erased when the evaluation ends. ``interrupted`` (the list of
  `sigterm_flag`; only where one process runs the evaluation, since the
  workers of a multi-worker run must stop at the same batch) is checked
  between batches: a stop request raises `StopRequested` there instead of
  waiting for the evaluation to end.
  """
  totals = dict.fromkeys(EVAL_KEYS, 0.0)
  with progress_bar(batches, desc=prefix.rstrip("/_") or "eval",
                    enabled=show_progress, leave=False, unit="batch") as bar:
    for batch in dataset:
      if interrupted:
        raise stop_requested(interrupted)
      for k, v in step(batch).items():
        totals[k] += float(v)
      bar.update(1)
  count = max(totals["eval/count"], 1.0)
  return {prefix + "loss": totals["eval/loss_sum"] / count,
          prefix + "acc": totals["eval/correct"] / count}
