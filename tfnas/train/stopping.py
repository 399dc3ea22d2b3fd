"""Stop requests: SIGTERM (a scheduler's stop) and Ctrl-C during a run.

A request is honoured where the state can be saved: between compiled
chunks of steps (`run_epoch`), between evaluation batches (one worker) or
at the end of an epoch (several workers, which must stop together: see
`stop_agreement`). The loop then saves a checkpoint and raises
`StopRequested`, which the apps turn into the exit status 128 + signal.

Python runs signal handlers in the main thread between bytecodes, so while
that thread waits inside TensorFlow (a first call optimises its graph, which
can take minutes) a handler runs only once the call returns. A watcher
thread (`_Watcher`) says at once that such a signal arrived, and ends the
process on a second Ctrl-C that the main thread cannot take either.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import threading
import time
from typing import Callable

from absl import logging as log
import tensorflow as tf

from tfnas import distribute
from tfnas.errors import StopRequested
from tfnas.train import rundir
from tfnas.train.progress import log_above_bars


class _Watcher:
  """Reads the signal numbers Python's C-level handler writes to its wakeup
  fd as each signal arrives, also while the main thread waits inside
  TensorFlow. A SIGINT or SIGTERM whose Python handler has not run within
  ``GRACE_S`` (the handlers report through `_handled`) is said to have
  arrived, once per kind; with ``exit_on_second_ctrl_c``, a Ctrl-C left so
  after an earlier one ends the process at once (status 130), as a second
  Ctrl-C does when the main thread can take it."""

  GRACE_S = 1.0

  def __init__(self, exit_on_second_ctrl_c: bool,
               run_dir: str | None = None):
    self._exit_on_second_ctrl_c = exit_on_second_ctrl_c
    self._run_dir = run_dir
    self._lock = threading.Lock()
    self._handled = collections.Counter()
    self._announced = set()
    self._read, self._write = os.pipe()
    os.set_blocking(self._write, False)
    self._previous_fd = signal.set_wakeup_fd(self._write,
                                             warn_on_full_buffer=False)
    threading.Thread(target=self._watch, name="tfnas-stop-signals",
                     daemon=True).start()

  def close(self) -> None:
    signal.set_wakeup_fd(self._previous_fd)
    os.close(self._write)  # The thread reads the end of the pipe and ends.

  def handled(self, signum: int) -> bool:
    """Counts a handler run for ``signum``; False when the watcher has
    already said that the signal arrived (the handler need not)."""
    with self._lock:
      self._handled[signum] += 1
      return signum not in self._announced

  def _watch(self) -> None:
    received = collections.Counter()
    try:
      while True:
        data = os.read(self._read, 64)
        if not data:
          return
        for signum in data:
          if signum in (signal.SIGINT, signal.SIGTERM):
            received[signum] += 1
            self._wait_for_handler(signum, received[signum])
    finally:
      os.close(self._read)

  def _wait_for_handler(self, signum: int, count: int) -> None:
    deadline = time.monotonic() + self.GRACE_S
    while time.monotonic() < deadline:
      with self._lock:
        if self._handled[signum] >= count:
          return
      time.sleep(0.02)
    ctrl_c = signum == signal.SIGINT and self._exit_on_second_ctrl_c
    if ctrl_c and count > 1:
      hint = self._run_dir and rundir.resume_hint(self._run_dir)
      # The process ends here: the app's own line on how to go on cannot
      # follow, so this one says it.
      log_above_bars(log.warning, "Ctrl-C again while TensorFlow is busy: "
                     "stopping at once, without saving the steps since the "
                     "last checkpoint%s", f"; {hint}" if hint else "")
      os._exit(128 + signum)  # pylint: disable=protected-access
    with self._lock:
      if signum in self._announced or self._handled[signum] >= count:
        return
      self._announced.add(signum)
    log_above_bars(
        log.warning, "%s arrived while TensorFlow runs a compiled call (a "
        "first call optimises its graph, which can take minutes): the run "
        "stops as asked when the call returns%s",
        "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name,
        "; Ctrl-C again to stop at once, without saving" if ctrl_c else "")


_watcher: _Watcher | None = None


def _handled(signum: int) -> bool:
  """For a handler as it runs: reports it to the watcher; False when the
  watcher has already said the signal arrived."""
  watcher = _watcher
  return watcher.handled(signum) if watcher is not None else True


def _interrupt(signum, frame):
  """Python's own Ctrl-C (KeyboardInterrupt), reported to the watcher."""
  _handled(signum)
  signal.default_int_handler(signum, frame)


@contextlib.contextmanager
def _watching(exit_on_second_ctrl_c: bool, run_dir: str | None = None):
  """A `_Watcher` for the block (the main thread only; an enclosing one
  stays in charge)."""
  global _watcher
  if _watcher is not None or (threading.current_thread() is not
                              threading.main_thread()):
    yield
    return
  _watcher = _Watcher(exit_on_second_ctrl_c, run_dir)
  try:
    yield
  finally:
    watcher, _watcher = _watcher, None
    watcher.close()


def stop_requested(interrupted: list, saved: bool = False) -> StopRequested:
  """The `StopRequested` for the requests in ``interrupted`` (the list of
  `sigterm_flag`): SIGTERM when one came, as when another worker asked and
  this one got none (a scheduler's stop)."""
  if signal.SIGTERM in interrupted or not interrupted:
    return StopRequested(signal.SIGTERM, saved)
  return StopRequested(interrupted[0], saved)


@contextlib.contextmanager
def sigterm_flag(strategy: tf.distribute.Strategy | None = None,
                 run_dir: str | None = None):
  """Yields a list that gets an entry when SIGTERM arrives.

  The loop checks it between compiled chunks, saves a checkpoint and stops
  (a scheduler's SIGTERM then loses at most one chunk). In a multi-worker
  run of ``strategy`` Ctrl-C does the same instead of raising wherever the
  program is (a KeyboardInterrupt in one worker would leave the others in
  a collective; see `stop_agreement`). The previous handlers are restored
  on exit; outside the main thread nothing is installed. ``run_dir``: the
  run whose checkpoint a second Ctrl-C, which ends the process at once,
  names for a resume.
  """
  interrupted = []
  multi_worker = strategy is not None and distribute.num_workers(strategy) > 1
  previous = {}

  def request(signum, frame):
    del frame
    first = not interrupted
    interrupted.append(signum)  # Recorded before anything that may fail.
    # Said once: a scheduler may repeat its SIGTERM.
    if _handled(signum) and first:
      log_above_bars(log.warning, "%s: stopping with a checkpoint after "
                     "this chunk of steps or %s", signal.Signals(signum).name,
                     "at the end of this epoch's evaluation" if multi_worker
                     else "evaluation batch")
  handlers = {signal.SIGTERM: request}
  if multi_worker:
    handlers[signal.SIGINT] = request
  elif signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    handlers[signal.SIGINT] = _interrupt  # Still Ctrl-C, now reported.
  try:
    for signum, handler in handlers.items():
      previous[signum] = signal.signal(signum, handler)
  except ValueError:  # Not the main thread.
    pass
  try:
    with _watching(exit_on_second_ctrl_c=not multi_worker, run_dir=run_dir):
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
def ctrl_c_stops(interrupted: list, when: str = "after this chunk of steps"):
  """While training chunks run, a first Ctrl-C is a stop request like
  SIGTERM (the chunk finishes, a checkpoint with its step and metric sums is
  saved); a second one raises at once. A KeyboardInterrupt surfacing right
  after a compiled chunk returned would lose the chunk's bookkeeping: its
  steps ran, but the step counter would not say so. The end of an epoch
  is guarded the same way (``when`` says where the stop comes): between
  its checkpoint and its history line it would lose the epoch's metrics.
  Only where Ctrl-C has
  Python's default handler or `sigterm_flag`'s equivalent (that of a
  multi-worker run already takes it) and in the main thread."""
  current = signal.getsignal(signal.SIGINT)
  if current is not signal.default_int_handler and current is not _interrupt:
    yield
    return

  def request(signum, frame):
    del frame
    interrupted.append(signum)
    signal.signal(signal.SIGINT, current)
    if _handled(signum):
      log_above_bars(log.warning, "Ctrl-C: stopping %s with a checkpoint "
                     "(Ctrl-C again to stop at once)", when)
  try:
    signal.signal(signal.SIGINT, request)
  except ValueError:  # Not the main thread.
    yield
    return
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, current)
