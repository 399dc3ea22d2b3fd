"""Shared app plumbing: strategies, device setup and clean error exits."""

from __future__ import annotations

import functools
import os
import sys

from absl import logging

# Errors that describe bad input; they end the app with one line, no trace.
_USER_ERRORS = ()


def user_errors():
  """The exception types that mean bad input (imported lazily)."""
  global _USER_ERRORS
  if not _USER_ERRORS:
    from tfnas.config import ConfigError
    from tfnas.data import DataError
    from tfnas.genotype import GenotypeError
    from tfnas.train.rundir import RunDirError
    _USER_ERRORS = (ConfigError, DataError, GenotypeError, RunDirError)
  return _USER_ERRORS


def clean_errors(prog: str):
  """Decorator for an app main: bad input → one line on stderr, exit 2."""
  def wrap(main):
    @functools.wraps(main)
    def wrapped(argv):
      try:
        return main(argv)
      except user_errors() as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
      except KeyboardInterrupt:
        print(f"{prog}: interrupted; state was saved, rerun with --resume",
              file=sys.stderr)
        sys.exit(130)
    return wrapped
  return wrap


def make_strategy(name: str):
  import tensorflow as tf
  if name == "auto":
    name = "mirrored" if len(tf.config.list_logical_devices("GPU")) > 1 else "default"
  if name == "default":
    return tf.distribute.get_strategy()
  if name == "mirrored":
    return tf.distribute.MirroredStrategy()
  if name == "multi_worker":
    # Cluster from TF_CONFIG, as with any TF multi-worker job.
    return tf.distribute.MultiWorkerMirroredStrategy()
  raise ValueError(f"unknown strategy {name!r}")


def quiet_tensorflow():
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  logging.set_verbosity(logging.INFO)
