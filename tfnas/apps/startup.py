"""TensorFlow start-up for the apps: a quiet import, thread pools, CPU
replicas, and the tf.distribute strategy named by --strategy.

A multi-worker strategy, thread pools and logical CPU devices can only be
set before TensorFlow initialises its devices, so apps call
`start_tensorflow` (or `import_tensorflow`) before anything else touches
TensorFlow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys

from absl import logging as log

from tfnas.errors import TfnasError


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


def start_run(flags, config):
  """`start_tensorflow` from a run app's --strategy, thread and replica
  flags, then op determinism and the global seeds when ``config`` asks for
  a deterministic run. Returns the strategy."""
  tf, strategy = start_tensorflow(
      flags.strategy, (flags.intra_op_threads, flags.inter_op_threads),
      cpu_replicas=flags.cpu_replicas)
  if config.deterministic:
    import keras
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
  return strategy


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
                       "tfnas.apps.startup.start_tensorflow") from None
  raise TfnasError(f"unknown strategy {name!r}")
