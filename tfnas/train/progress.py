"""Progress bars for long loops (tqdm on stderr; nothing when disabled,
e.g. by ``--noprogress``)."""

from __future__ import annotations

import contextlib
import sys

from tqdm import tqdm


class _Bar:
  def __init__(self, bar):
    self._bar = bar

  def update(self, n: int, **postfix) -> None:
    if self._bar is None:
      return
    if postfix:
      self._bar.set_postfix({k: f"{v:.4f}" for k, v in postfix.items()},
                            refresh=False)
    self._bar.update(n)


def log_above_bars(log_fn, *args) -> None:
  """Calls ``log_fn(*args)`` (an absl log call) with the progress bars
  lifted, so the line does not land at the end of a bar; the bars are
  redrawn below it. Meant for signal handlers: with no bar on screen it
  just logs (tqdm's lock is not created there), and a failure to write is
  dropped rather than raised into the interrupted code."""
  try:
    if getattr(tqdm, "_instances", None):
      with tqdm.external_write_mode(file=sys.stderr):
        log_fn(*args)
    else:
      log_fn(*args)
  except Exception:  # pylint: disable=broad-except
    pass  # A message lost, not a run.


@contextlib.contextmanager
def progress_bar(total: int | None, initial: int = 0, desc: str = "",
                 enabled: bool = True, leave: bool = True, unit: str = "step"):
  """A progress bar over ``total`` units (None: a count); a no-op when
  ``enabled`` is False. ``leave=False`` erases it when done."""
  if not enabled:
    yield _Bar(None)
    return
  bar = tqdm(total=total, initial=initial, desc=desc, unit=unit,
             file=sys.stderr, dynamic_ncols=True, leave=leave)
  try:
    yield _Bar(bar)
  finally:
    bar.close()
