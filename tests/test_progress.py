"""Progress bars of long loops: evaluation shows one and sums as without."""

import tensorflow as tf

from tfnas.train import loop


def _step(batch):
  return {"eval/loss_sum": tf.constant(batch), "eval/correct": tf.constant(1.0),
          "eval/count": tf.constant(2.0)}


def test_evaluation_bar_counts_the_batches_and_changes_nothing(capsys):
  batches = [1.0, 2.0, 3.0]
  quiet = loop.evaluate(batches, _step)
  assert capsys.readouterr().err == ""
  shown = loop.evaluate(batches, _step, prefix="val/child_",
                        show_progress=True, batches=3)
  assert quiet == {"val/loss": 1.0, "val/acc": 0.5}
  assert shown == {"val/child_loss": 1.0, "val/child_acc": 0.5}
  err = capsys.readouterr().err
  assert "val/child:" in err and "/3 " in err  # A bar over the 3 batches.
