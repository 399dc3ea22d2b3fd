"""The base of every bad-input error, and the stop request (no TensorFlow
import: apps catch them before anything heavy is loaded)."""

import signal


class TfnasError(ValueError):
  """Bad input or state the user can fix; the message says what and how.

  Apps print it as one line and exit with status 2, without a traceback.
  """


class StopRequested(KeyboardInterrupt):
  """A stop request (SIGTERM, or Ctrl-C) honoured at a safe point, after
  saving what there is to save.

  ``signum``: the signal that asked, so that the process can exit with the
  status a shell expects (128 + signum). ``saved``: the state was saved
  where the stop was honoured (nothing left to save on the way out).
  """

  def __init__(self, signum: int = signal.SIGINT, saved: bool = False):
    super().__init__()
    self.signum = int(signum)
    self.saved = saved
