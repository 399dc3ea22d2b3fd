"""The base of every bad-input error (no TensorFlow import: apps catch it
before anything heavy is loaded)."""


class TfnasError(ValueError):
  """Bad input or state the user can fix; the message says what and how.

  Apps print it as one line and exit with status 2, without a traceback.
  """
