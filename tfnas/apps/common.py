"""Shared app plumbing: quiet TensorFlow start-up, strategies, clean errors."""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import logging
import os
import re
import signal
import sys
from typing import Callable

from absl import logging as log

from tfnas.errors import StopRequested, TfnasError
from tfnas.train import rundir


@contextlib.contextmanager
def _native_stderr_silenced(enabled: bool):
  """Hides native (C++) log lines written to fd 2 while TF starts.

  TensorFlow's start-up notices (oneDNN, CUDA probing) bypass
  TF_CPP_MIN_LOG_LEVEL in this release; Python exceptions still propagate.

  Yields:
    ``unsilenced``: a context manager inside which stderr is not silenced
    (a no-op one when ``enabled`` is false).
  """
  if not enabled:
    yield contextlib.nullcontext
    return
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)

  @contextlib.contextmanager
  def unsilenced():
    """Lets what is written inside reach stderr (our own lines)."""
    sys.stderr.flush()
    os.dup2(saved, 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(devnull, 2)
  try:
    yield unsilenced
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def import_tensorflow(before_devices=None, threads=(0, 0), cpu_replicas=0):
  """Imports TensorFlow and initialises its devices without log noise.

  ``before_devices(tf, unsilenced)``, if given, runs between the import and
  the device initialisation (MultiWorkerMirroredStrategy must be created
  there: it configures collective ops, which TF refuses once its context is
  up); ``unsilenced()`` is a context in which stderr is not silenced.
  ``threads`` is ``(intra_op, inter_op)``, each 0 for TensorFlow's default;
  like ``before_devices`` it needs the first call of the process, as does
  ``cpu_replicas`` (> 0: the CPU split into that many logical devices).
  Set TF_CPP_MIN_LOG_LEVEL=0 to see TensorFlow's native start-up logs.
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  quiet = os.environ["TF_CPP_MIN_LOG_LEVEL"] not in ("0", "1")
  with _native_stderr_silenced(quiet) as unsilenced:
    import tensorflow as tf
    _set_threads(tf, *threads)
    if cpu_replicas:
      _split_cpu(tf, cpu_replicas)
    if before_devices is not None:
      before_devices(tf, unsilenced)
    tf.config.list_logical_devices()
    if quiet:
      # oneDNN logs a one-time ERROR-level notice (not filtered by
      # TF_CPP_MIN_LOG_LEVEL=2) on the process's first int64 transpose,
      # which TFP's categorical sampling (DSNAS) makes mid-run. Making one
      # here lets the notice fall into this silenced block.
      with tf.device("/CPU:0"):
        tf.transpose(tf.zeros([1, 1], tf.int64))
  if quiet:
    # TensorFlow's own INFO chatter (e.g. the checkpoint saver's per-save
    # "Sharding callback duration") goes through absl's logger like ours.
    logging.getLogger("absl").addFilter(_drop_tensorflow_info)
    # SavedModel writing logs "Assets written to ..." on TF's own logger.
    logging.getLogger("tensorflow").addFilter(_drop_tensorflow_info)
  # Shared traced functions (tfnas/layers/shared_function.py) are distinct
  # tf.functions made by one factory, each traced once on purpose; TF's
  # frequent-retracing detector counts them together and warns.
  logging.getLogger("absl").addFilter(_drop_shared_function_retracing)
  logging.getLogger("tensorflow").addFilter(_drop_shared_function_retracing)
  return tf


def _set_threads(tf, intra_op: int, inter_op: int) -> None:
  """Sizes TensorFlow's thread pools (0 leaves a pool at its default)."""
  threading = tf.config.threading
  for which, n in (("intra_op", intra_op), ("inter_op", inter_op)):
    if n < 0:
      raise TfnasError(f"--{which}_threads must be 0 (TensorFlow's default) "
                       f"or more, got {n}")
    current = getattr(threading, f"get_{which}_parallelism_threads")()
    if not n or n == current:
      continue
    try:
      getattr(threading, f"set_{which}_parallelism_threads")(n)
    except RuntimeError:
      raise TfnasError(f"--{which}_threads={n} must be set before TensorFlow "
                       "starts; this process started it with "
                       f"{current or 'the default'}") from None


def _split_cpu(tf, n: int) -> None:
  """The first CPU as ``n`` logical devices (MirroredStrategy replicas)."""
  cpu = tf.config.list_physical_devices("CPU")[0]
  wanted = [tf.config.LogicalDeviceConfiguration()] * n
  current = tf.config.get_logical_device_configuration(cpu)
  if current is not None and len(current) == n:
    return
  try:
    tf.config.set_logical_device_configuration(cpu, wanted)
  except RuntimeError:
    raise TfnasError(f"--cpu_replicas={n} must be set before TensorFlow "
                     "starts; this process started it already") from None


def _drop_tensorflow_info(record: logging.LogRecord) -> bool:
  return not (record.levelno <= logging.INFO and
              f"{os.sep}tensorflow{os.sep}" in record.pathname)


def _drop_shared_function_retracing(record: logging.LogRecord) -> bool:
  message = record.getMessage()
  return not ("triggered tf.function retracing" in message and
              "_make_function.<locals>.run" in message)


# Help flags (absl's, and -h) → whether they list only the app's own flags.
_HELP_ARGS = {"-h": True, "-?": True, "--help": True, "-help": True,
              "--helpshort": True, "-helpshort": True, "--helpfull": False,
              "-helpfull": False}


def run_app(main, doc: str | None, *flag_modules) -> None:
  """``absl.app.run(main)``, with ``doc`` as the usage text and the flags
  defined in ``flag_modules`` (module objects or names) listed by ``--help``
  and ``--helpshort``.

  absl takes both from the ``__main__`` module (the flags: those of the
  module named by ``sys.argv[0]``); an installed entry point is a generated
  script with neither.
  """
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  main_module = sys.modules.get("__main__")
  if doc and main_module is not None and not main_module.__doc__:
    main_module.__doc__ = doc.replace("%", "%%")
  for module in flag_modules:
    for flag in flags.FLAGS.get_flags_for_module(module):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)

  def fail(message: str):
    sep = "\n" if "\n" in message else " "
    sys.stderr.write(f"FATAL Flags parsing error:{sep}{message}\n"
                     "Pass --helpshort or --helpfull to see help on "
                     "flags.\n")
    sys.exit(1)

  def parse(argv):  # absl's parse_flags_with_usage, with hints.
    options = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    for arg in options:
      if arg in _HELP_ARGS:  # Help asked for is not an error: status 0.
        app.usage(shorthelp=_HELP_ARGS[arg], writeto_stdout=True)
        sys.exit(0)
    try:
      rest = flags.FLAGS(argv)
    except flags.Error as e:
      message = str(e)
      missing = re.search(r"No such file or directory: '([^']+)'", message)
      if ("Unable to open flagfile" in message and missing and
          not os.path.isabs(missing.group(1))):
        # Flagfiles include each other by paths relative to the working
        # directory, as absl reads them.
        message += (" (flagfile paths, also those inside a flagfile, are "
                     f"relative to the working directory {os.getcwd()}; run "
                     "from the repository root)")
      fail(message)
    if len(rest) > 1:
      # absl would print the whole help before this line.
      hint = next((f"; to read flags from {a}, pass --flagfile={a}"
                   for a in rest[1:] if os.path.isfile(a)), "")
      fail(f"unexpected arguments {rest[1:]}: this command takes only "
           f"--flags{hint}")
    return rest

  # Until a run's loop installs its own handler (a stop request honoured
  # after saving), SIGTERM stops at once like Ctrl-C, with the one line of
  # `clean_errors` on what a rerun continues, not silently: while the run
  # is built. (The first chunk's trace is inside the loop: a SIGTERM then
  # stops after that chunk, with a checkpoint.)
  _raise_on_sigterm()
  app.run(main, flags_parser=parse)


def _raise_on_sigterm() -> None:
  def stop(signum, frame):
    del frame
    raise StopRequested(signum)
  try:
    signal.signal(signal.SIGTERM, stop)
  except ValueError:  # Not the main thread.
    pass


def print_final(history: list, run_dir: str, epochs: int,
                keys: tuple[str, ...]) -> None:
  """Prints the last epoch's ``keys`` as the run's final line; for a resumed
  run that had nothing left to do, says so and reads them from
  ``history.jsonl``."""
  last = history[-1] if history else rundir.last_history(run_dir)
  if not history:
    print(f"{run_dir} already finished {last.get('epoch', epochs)} epochs "
          f"(--epochs={epochs}); resume with a larger --epochs to train "
          "longer")
  if last:
    # An epoch resumed after its last step, from a checkpoint whose metric
    # sums were not recorded, has no train metrics.
    shown = ", ".join(f"{k}={last[k]:.4f}" for k in keys
                      if isinstance(last.get(k), (int, float)))
    print(f"final: {shown}; run directory: {run_dir}")


def clean_errors(prog: str, run_dir: Callable[[], str | None] | None = None):
  """Decorator for an app main: bad input → one line on stderr, exit 2;
  Ctrl-C (or SIGTERM) → one line on what a rerun can continue, exit 130
  (143 after SIGTERM).

  Args:
    prog: the app's name, first on each line.
    run_dir: for apps that resume: returns the run directory (--run_dir).
  """
  def wrap(main):
    @functools.wraps(main)
    def wrapped(argv):
      try:
        return main(argv)
      except TfnasError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
      except KeyboardInterrupt as e:
        print(f"{prog}: {interrupted_line(run_dir() if run_dir else None)}",
              file=sys.stderr)
        # The shell's status for a process stopped by that signal.
        sys.exit(128 + getattr(e, "signum", signal.SIGINT))
    return wrapped
  return wrap


def holds_checkpoints(folder: str) -> bool:
  """Whether ``folder`` is a checkpoint folder: its checkpoint list, or
  checkpoint files when the list was lost."""
  return os.path.exists(os.path.join(folder, "checkpoint")) or bool(
      glob.glob(os.path.join(glob.escape(folder), "*-*.index")))


def interrupted_line(run_dir: str | None) -> str:
  """What an interrupted run left: a checkpoint to resume, a run directory
  without one yet, or nothing (``run_dir`` None: an app that does not
  resume)."""
  if run_dir is None:
    return "interrupted"
  if holds_checkpoints(os.path.join(run_dir, "ckpt")):
    return (f"interrupted; {run_dir} holds the last checkpoint: rerun with "
            "--resume to continue")
  if os.path.exists(os.path.join(run_dir, "config.json")):
    return (f"interrupted before the first checkpoint; rerun with --resume "
            f"to start {run_dir} over")
  return "interrupted before the run started; nothing was saved"


def cluster_tasks(tf_config: str | None) -> int:
  """Tasks in the cluster of a ``TF_CONFIG`` value (0 when unset; -1 when
  it is not a JSON cluster description)."""
  if not tf_config:
    return 0
  try:
    cluster = json.loads(tf_config).get("cluster", {})
    return sum(len(tasks) for tasks in cluster.values())
  except (ValueError, AttributeError, TypeError):
    return -1


def start_tensorflow(strategy_name: str, threads=(0, 0), cpu_replicas=0):
  """Imports TensorFlow quietly and makes the strategy named by --strategy.

  Returns ``(tf, strategy)``. Apps call this before anything else touches
  TensorFlow: a multi-worker strategy and ``threads`` (``(intra_op,
  inter_op)``, 0 for TensorFlow's default) can only be set first. ``auto``
  is ``multi_worker`` when ``TF_CONFIG`` describes a cluster (of more than
  one task), so workers started without the flag still form one run, and
  ``mirrored`` when ``cpu_replicas`` > 1 asks for CPU replicas.
  """
  tasks = cluster_tasks(os.environ.get("TF_CONFIG"))
  if strategy_name == "auto" and tasks not in (0, 1):
    strategy_name = "multi_worker"
  elif strategy_name == "multi_worker" and tasks in (0, 1):
    log.warning("--strategy=multi_worker without a TF_CONFIG cluster of "
                "several tasks (%s): running as one worker",
                "no TF_CONFIG" if tasks == 0 else "one task")
  made = []
  def multi_worker(tf, unsilenced):
    # The cluster comes from TF_CONFIG, as for any TF multi-worker job.
    # TensorFlow blocks inside the constructor until every task of the
    # cluster has connected; Python signal handlers cannot run meanwhile,
    # so Ctrl-C gets its default action (end the process at once: nothing
    # has been done yet) until it returns (SIGTERM: `_default_signal_actions`).
    if tasks > 1:
      with unsilenced():
        log.info("multi-worker run (%s of a %d-task TF_CONFIG cluster): "
                 "waiting until every task has connected (Ctrl-C ends this "
                 "process while it waits; TensorFlow takes SIGTERM then as "
                 "a preemption notice and ignores it)",
                 _task_name(os.environ.get("TF_CONFIG")), tasks)
    with _default_signal_actions():
      try:
        made.append(tf.distribute.MultiWorkerMirroredStrategy())
      except (ValueError, KeyError, TypeError) as e:
        raise TfnasError(f"bad TF_CONFIG for a multi-worker run ({e}); "
                         "it must be JSON with a 'cluster' of 'worker' "
                         "addresses and this process's 'task' (type, "
                         "index)") from None
  if strategy_name == "auto" and cpu_replicas > 1:
    strategy_name = "mirrored"
  elif strategy_name in ("default", "multi_worker") and cpu_replicas > 1:
    log.warning("--cpu_replicas=%d with --strategy=%s: one replica per "
                "%s (CPU replicas need --strategy=mirrored)", cpu_replicas,
                strategy_name, "process" if strategy_name == "default"
                else "worker")
  tf = import_tensorflow(
      multi_worker if strategy_name == "multi_worker" else None, threads,
      cpu_replicas)
  if made:
    strategy = made[0]
  else:
    strategy = make_strategy(strategy_name)
  if cpu_replicas > 1 and tf.config.list_logical_devices("GPU"):
    log.warning("--cpu_replicas=%d is ignored where GPUs are visible: "
                "replicas run on the GPUs", cpu_replicas)
  if strategy.num_replicas_in_sync > 1 or made:  # One replica: nothing new.
    log.info("%s: %d replica%s%s", type(strategy).__name__,
             strategy.num_replicas_in_sync,
             "" if strategy.num_replicas_in_sync == 1 else "s",
             f" over {tasks} connected tasks" if made and tasks > 1 else "")
  return tf, strategy


def _task_name(tf_config: str | None) -> str:
  """``type index`` of this process's task in ``TF_CONFIG`` ("task ?" when
  it does not say; a malformed one is reported by the strategy)."""
  try:
    task = json.loads(tf_config or "{}").get("task", {})
    return f"{task['type']} {task['index']}"
  except (ValueError, AttributeError, TypeError, KeyError):
    return "task ?"


@contextlib.contextmanager
def _default_signal_actions():
  """SIGTERM and SIGINT take their default action (end the process)
  inside the block; the previous handlers come back after it. Outside the
  main thread, where handlers cannot be set, it does nothing.

  Ctrl-C then ends a multi-worker start-up waiting for its cluster. SIGTERM
  does only until TensorFlow's coordination service installs its own
  handler (a preemption notice that does not stop the process) inside the
  strategy's constructor; no Python code can run while that constructor
  waits, so nothing can take it back before it returns.
  """
  previous = {}
  try:
    for signum in (signal.SIGTERM, signal.SIGINT):
      if signal.getsignal(signum) is not signal.SIG_IGN:  # E.g. `cmd &`.
        previous[signum] = signal.signal(signum, signal.SIG_DFL)
  except ValueError:  # Not the main thread.
    pass
  try:
    yield
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def make_strategy(name: str):
  """The tf.distribute strategy named by --strategy (for ``multi_worker``
  see `start_tensorflow`)."""
  tf = import_tensorflow()
  if name == "auto":
    gpus = tf.config.list_logical_devices("GPU")
    name = "mirrored" if len(gpus) > 1 else "default"
  if name == "default":
    return tf.distribute.get_strategy()
  if name == "mirrored":
    from tfnas.distribute import mirrored_strategy
    strategy = mirrored_strategy()
    if strategy.num_replicas_in_sync == 1:
      log.warning("--strategy=mirrored found one device (%s): running one "
                  "replica, like --strategy=default (--cpu_replicas=N "
                  "splits a CPU into N)",
                  ", ".join(strategy.extended.worker_devices))
    return strategy
  if name == "multi_worker":
    try:
      return tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as e:
      raise TfnasError("--strategy=multi_worker must be set up before "
                       f"TensorFlow starts ({e}); create it with "
                       "tfnas.apps.common.start_tensorflow") from None
  raise TfnasError(f"unknown strategy {name!r}")
