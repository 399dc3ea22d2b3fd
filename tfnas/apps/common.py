"""Shared app plumbing: flag parsing and help, final lines, clean errors.

TensorFlow's start-up and the --strategy live in `tfnas.apps.startup`.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import sys
from typing import Callable

from tfnas.errors import StopRequested, TfnasError
from tfnas.train import rundir


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
  # Progress lines ("epoch 3: train/loss=...") without absl's date, thread
  # and source prefix; warnings keep it. --showprefixforinfo restores it.
  flags.FLAGS.set_default("showprefixforinfo", False)

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


# Retraining flagfiles by dataset, for the hint after a search.
TRAIN_FLAGFILES = {"digits": "flags/train_digits.cfg",
                   "cifar10": "flags/train_cifar10.cfg",
                   "imagenet2012": "flags/train_imagenet.cfg"}


def next_step(run_dir: str, kind: str, dataset: str = "") -> str:
  """What to run after a finished run: ``kind`` "retrain" (a search whose
  derived cell is retrained), "export" (a DSNAS search, whose child deploys
  as it is) or "serve" (a retraining run)."""
  name = os.path.basename(os.path.normpath(run_dir)) or "model"
  export = f"tfnas-export --run_dir={run_dir} --export_dir=exports/{name}"
  if kind == "export":
    return f"deploy the searched child: {export}"
  if kind == "serve":
    return f"export it for TF Serving: {export}"
  flagfile = TRAIN_FLAGFILES.get(dataset)
  data = (f"--flagfile={flagfile}" if flagfile else
          f"--dataset={dataset}")
  return (f"retrain the derived cell: tfnas-train {data} "
          f"--genotype={run_dir} --run_dir=runs/{name}_train")


def print_final(history: list, run_dir: str, epochs: int,
                keys: tuple[str, ...],
                next_command: str | None = None) -> None:
  """Prints the last epoch's ``keys`` as the run's final line, then
  ``next_command`` (`next_step`); for a resumed run that had nothing left
  to do, says so and reads them from ``history.jsonl``."""
  last = history[-1] if history else rundir.last_history(run_dir)
  if not history:
    done = last.get("epoch", epochs)
    print(f"{run_dir} already finished {done} epoch{'' if done == 1 else 's'} "
          f"(--epochs={epochs}); resume with a larger --epochs to train "
          "longer")
  if last:
    # An epoch resumed after its last step, from a checkpoint whose metric
    # sums were not recorded, has no train metrics.
    shown = ", ".join(f"{k}={last[k]:.4f}" for k in keys
                      if isinstance(last.get(k), (int, float)))
    print(f"final: {shown}; run directory: {run_dir}")
  if next_command:
    print(f"next: {next_command}")


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


#: Whether a folder holds checkpoints (`rundir.holds_checkpoints`).
holds_checkpoints = rundir.holds_checkpoints


def interrupted_line(run_dir: str | None) -> str:
  """What an interrupted run left: a checkpoint to resume, a run directory
  without one yet, or nothing (``run_dir`` None: an app that does not
  resume)."""
  if run_dir is None:
    return "interrupted"
  hint = rundir.resume_hint(run_dir)
  if hint is None:
    return "interrupted before the run started; nothing was saved"
  first = not holds_checkpoints(os.path.join(run_dir, "ckpt"))
  return f"interrupted{' before the first checkpoint' if first else ''}; {hint}"
