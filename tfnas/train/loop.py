"""Machinery shared by the search loop and the retraining loop.

Both loops run epochs of chunks (``steps_per_loop`` steps per call of a
step loop, `step_loops`), checkpoint with a ``tf.train.CheckpointManager``
(epoch and step-in-epoch included, so a resumed run continues mid-epoch),
save on SIGTERM / Ctrl-C before exiting (`stopping`), draw a progress bar
and append one JSON line of metrics per epoch to ``history.jsonl``. The
pieces live here;
what a step computes stays with each loop.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping

from absl import logging as log
import tensorflow as tf

from tfnas import dataset_names
from tfnas import distribute
from tfnas import data as data_lib
from tfnas.data import DataError
from tfnas.train import checkpointing
from tfnas.train import rundir
from tfnas.train import stopping
from tfnas.train import summaries
from tfnas.train.progress import progress_bar


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
  with stopping.sigterm_flag(strategy, run_dir) as interrupted:
    try:
      while int(epoch.numpy()) < epochs:
        if stop_after_epochs is not None and len(history) >= stop_after_epochs:
          break
        history.append(run_epoch(interrupted))
        stopping.stop_after_epoch(agree, interrupted,
                                  int(epoch.numpy()) < epochs)
    except KeyboardInterrupt as e:
      if not getattr(e, "saved", False):
        save()
      writer.flush()
      # How to continue is the caller's to say (the apps: --resume).
      log.warning("stopped: state saved in %s (%d of %d epochs finished)",
                  run_dir, int(epoch.numpy()), epochs)
      raise
  return history


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


def save_dataset_record(write_dir: str, info) -> None:
  """Writes the run's `tfnas.data.DATASET_RECORD` for an npz dataset (its
  shape, normalisation and classes), which lets an export of the run work
  without the data file."""
  text = data_lib.dataset_record(info)
  if text is not None:
    rundir.atomic_write(os.path.join(write_dir, data_lib.DATASET_RECORD),
                        text)


def checkpoint_manager(checkpoint: tf.train.Checkpoint, run_dir: str,
                       resuming: bool, max_to_keep: int = 3,
                       restore_dir: str | None = None,
                       described_by: str = "config.json"):
  """The run's CheckpointManager (``run_dir/ckpt``); restores when resuming,
  from the latest checkpoint in ``restore_dir/ckpt`` (default ``run_dir``:
  a non-chief worker saves into its scratch directory but restores the
  chief's checkpoint). ``described_by``: the run's files its network is
  built from (`checkpointing.restore_latest`)."""
  if resuming:
    # Before the manager reads the checkpoint list: unreadable checkpoints
    # skipped here leave it (only this process's own directory is edited).
    restore_dir = restore_dir or run_dir
    latest = checkpointing.restore_latest(
        checkpoint, os.path.join(restore_dir, "ckpt"),
        forget_unreadable=restore_dir == run_dir, described_by=described_by)
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
                    enabled=show_progress) as bar, \
       stopping.ctrl_c_stops(interrupted):
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
        raise stopping.stop_requested(interrupted, saved=True)
  return totals


def chunk_runner(train_loop, iterators: tuple, optimizer, writer):
  """``run_chunk(n)`` for `run_epoch`: ``n`` steps of ``train_loop`` (a step
  loop, `step_loops`) on ``iterators``, then the chunk's ``train/lr`` (at its
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


# Where a Ctrl-C at the end of an epoch stops the run
# (`stopping.ctrl_c_stops` around the epoch's checkpoint and history line).
AT_EPOCH_END = ("once this epoch's metrics are written (after the last "
                "epoch the run simply ends)")


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
    with open(path, errors="replace") as f:  # A damaged line stays a line.
      lines = [line for line in f if line.strip()]
  except FileNotFoundError:
    lines = []
  keep = [line for line in lines if not _logs_epoch_from(line, epoch)]
  cut = bool(lines) and not lines[-1].endswith("\n")
  if len(keep) == len(lines) and not cut:
    with open(path, "a") as f:
      f.write(json.dumps(dict(metrics)) + "\n")
    return
  if cut:  # Appending would glue the new line onto the damaged one.
    log.warning("history.jsonl: its last line does not end (%r: a file cut "
                "short?); epoch %s starts a line of its own", lines[-1][-40:],
                epoch)
  if len(keep) != len(lines):
    log.warning("history.jsonl: replacing the lines of epochs from %s on, "
                "which this run repeated from an older checkpoint", epoch)
  rundir.atomic_write(path, "".join(
      line if line.endswith("\n") else line + "\n" for line in keep) +
                      json.dumps(dict(metrics)) + "\n")


def _logs_epoch_from(line: str, epoch) -> bool:
  """Whether a history line is of ``epoch`` or later."""
  if not isinstance(epoch, int):
    return False
  try:
    logged = json.loads(line).get("epoch")
  except (ValueError, AttributeError):
    return False  # Not ours to judge: kept.
  return isinstance(logged, int) and logged >= epoch


def check_same_data(strategy, info, *splits) -> None:
  """Refuses a multi-worker run whose workers read different data: each
  worker resolves ``--dataset`` itself (another copy of an npz file, another
  tfds version), and different data would train each worker's replicas on
  other images with other normalisation, silently. Compares the dataset's
  description (an npz file by its content fingerprint, not its path) and
  the splits' sizes; nothing to do with one worker."""
  name = info.name
  if dataset_names.is_npz_name(name):
    name = dataset_names.split_name(name)[1] or "npz"
  described = {**dataclasses.asdict(info), "name": name,
               "splits": [split.num_examples for split in splits]}
  if not distribute.same_on_every_worker(strategy, json.dumps(described)):
    raise DataError(
        f"the workers read different data for --dataset={info.name} (its "
        "content, normalisation or split sizes differ); give every worker "
        "the same file or the same prepared data")
