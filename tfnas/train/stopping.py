"""Stop requests: SIGTERM (a scheduler's stop) and Ctrl-C during a run.

A request is honoured where the state can be saved: between compiled
chunks of steps (`run_epoch`), between evaluation batches (one worker) or
at the end of an epoch (several workers, which must stop together: see
`stop_agreement`). The loop then saves a checkpoint and raises
`StopRequested`, which the apps turn into the exit status 128 + signal.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Callable

from absl import logging as log
import tensorflow as tf

from tfnas import distribute
from tfnas.errors import StopRequested
from tfnas.train.progress import log_above_bars


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

  def request(signum, frame):
    del frame
    first = not interrupted
    interrupted.append(signum)  # Recorded before anything that may fail.
    if first:  # Said once: a scheduler may repeat its SIGTERM.
      log_above_bars(log.warning, "%s: stopping with a checkpoint after "
                     "this chunk of steps or %s", signal.Signals(signum).name,
                     "at the end of this epoch's evaluation" if multi_worker
                     else "evaluation batch")
  try:
    for signum in signums:
      previous[signum] = signal.signal(signum, request)
  except ValueError:  # Not the main thread.
    pass
  try:
    yield interrupted
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def stop_after_epoch(agree: Callable[[bool], bool], interrupted: list,
                     more_epochs: bool) -> None:
  """After an epoch has ended and been saved: raises `StopRequested` when a
  stop was requested (by any worker: ``agree``, see `stop_agreement`) and
  epochs remain. A request that comes while the last epoch ends changes
  nothing: the run is complete."""
  if more_epochs and agree(bool(interrupted)):
    raise stop_requested(interrupted, saved=True)


def evaluation_interrupts(strategy: tf.distribute.Strategy,
                          interrupted: list) -> list | None:
  """``interrupted`` for `evaluate` where a stop may end an evaluation
  between batches (one worker); None in a multi-worker run, whose workers
  stop together at the end of the epoch (`stop_after_epoch`)."""
  return interrupted if distribute.num_workers(strategy) <= 1 else None


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


@contextlib.contextmanager
def ctrl_c_stops(interrupted: list):
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
    log_above_bars(log.warning, "Ctrl-C: stopping after this chunk of "
                   "steps with a checkpoint (Ctrl-C again to stop at once)")
  try:
    signal.signal(signal.SIGINT, request)
  except ValueError:  # Not the main thread.
    yield
    return
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, signal.default_int_handler)
