"""Long loops: progress bars (evaluation shows one and sums as without),
stop requests and the epoch log."""

import json

import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from tfnas.train import loop, rundir, step_loops, stopping, summaries


def _step(batch):
  return {"eval/loss_sum": tf.constant(batch), "eval/correct": tf.constant(1.0),
          "eval/count": tf.constant(2.0)}


def test_evaluation_bar_counts_the_batches_and_changes_nothing(capsys):
  batches = [1.0, 2.0, 3.0]
  quiet = step_loops.evaluate(batches, _step)
  assert capsys.readouterr().err == ""
  shown = step_loops.evaluate(batches, _step, prefix="val/child_",
                              show_progress=True, batches=3)
  assert quiet == {"val/loss": 1.0, "val/acc": 0.5}
  assert shown == {"val/child_loss": 1.0, "val/child_acc": 0.5}
  err = capsys.readouterr().err
  assert "val/child:" in err and "/3 " in err  # A bar over the 3 batches.
  assert "batch/s" in err
  # Erased when done: the last thing written blanks the line.
  assert err.endswith("\r") and not err.rstrip("\r").split("\r")[-1].strip()


def test_evaluation_bar_without_a_length_counts(capsys):
  shown = step_loops.evaluate([1.0, 2.0], _step, show_progress=True)
  assert shown == {"val/loss": 0.75, "val/acc": 0.5}
  err = capsys.readouterr().err
  assert "val: 0batch [" in err and "/" not in err.split("[")[0]  # A count.
  assert err.endswith("\r")


def test_ctrl_c_during_a_chunk_stops_after_it_with_its_sums():
  import os
  import signal
  import pytest
  # As in an interactive run (a background CI may start with SIGINT ignored).
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    _ctrl_c_case(os, signal, pytest)
  finally:
    signal.signal(signal.SIGINT, previous)


def _ctrl_c_case(os, signal, pytest):
  step = tf.Variable(0)
  saved = []

  def run_chunk(n):
    if not saved:  # Ctrl-C arrives while the first chunk runs.
      os.kill(os.getpid(), signal.SIGINT)
    return {"train/loss_sum": tf.constant(float(n)),
            "train/count": tf.constant(float(n))}
  with pytest.raises(KeyboardInterrupt):
    loop.run_epoch(run_chunk=run_chunk, steps=6, start=0, steps_per_loop=2,
                   checkpoint_every_steps=0, step_in_epoch=step,
                   interrupted=[], save=lambda t: saved.append(dict(t)),
                   desc="", show_progress=False)
  # The chunk finished and was counted; the save had its sums.
  assert int(step.numpy()) == 2
  assert saved == [{"train/loss_sum": 2.0, "train/count": 2.0}]
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_evaluation_stops_between_batches_on_a_request():
  import signal
  import pytest
  seen = []

  def step(batch):
    seen.append(batch)
    if len(seen) == 2:
      requests.append(signal.SIGTERM)  # As the SIGTERM handler does.
    return _step(batch)
  requests = []
  with pytest.raises(stopping.StopRequested) as stopped:
    step_loops.evaluate([1.0, 2.0, 3.0, 4.0], step, interrupted=requests)
  assert seen == [1.0, 2.0]  # Stopped before the third batch.
  assert stopped.value.signum == signal.SIGTERM and not stopped.value.saved


def test_stop_after_an_epoch_asks_every_worker_only_when_epochs_remain():
  import signal
  import pytest
  asked = []

  def agree(stop):  # Another worker asked: all stop.
    asked.append(stop)
    return True
  stopping.stop_after_epoch(agree, [], more_epochs=False)
  assert asked == []  # The last epoch: a complete run, no collective.
  with pytest.raises(stopping.StopRequested) as stopped:
    stopping.stop_after_epoch(agree, [], more_epochs=True)
  assert asked == [False]
  # Stopped on another worker's request (a scheduler's SIGTERM), saved.
  assert stopped.value.signum == signal.SIGTERM and stopped.value.saved
  stopping.stop_after_epoch(lambda stop: stop, [], more_epochs=True)  # Nobody.


def test_only_one_worker_stops_in_an_evaluation(monkeypatch):
  requests = [15]
  monkeypatch.setattr(stopping.distribute, "num_workers", lambda strategy: 1)
  assert stopping.evaluation_interrupts(None, requests) is requests
  # Several workers evaluate in step: a stop there waits for the epoch end.
  monkeypatch.setattr(stopping.distribute, "num_workers", lambda strategy: 2)
  assert stopping.evaluation_interrupts(None, requests) is None


def test_history_lines_of_repeated_epochs_are_replaced(tmp_path):
  # A resume from an older checkpoint repeats epochs 2-3: each keeps one
  # line, its latest; lines that are not ours (undecodable ones too) stay.
  path = tmp_path / "history.jsonl"
  for epoch in (1, 2, 3):
    loop.append_history(str(tmp_path), {"epoch": epoch, "v": epoch})
  with open(path, "ab") as f:
    f.write(b"\xff damaged\n")
  loop.append_history(str(tmp_path), {"epoch": 2, "v": 20})
  lines = path.read_text(errors="replace").splitlines()
  assert [json.loads(l) for l in lines if l.startswith("{")] == [
      {"epoch": 1, "v": 1}, {"epoch": 2, "v": 20}]
  assert len(lines) == 3 and "damaged" in lines[1]


def test_a_history_cut_short_gets_a_new_line(tmp_path):
  # A file cut inside its last line (a full disk, a copy broken off): the
  # next epoch's line must not be glued onto it.
  path = tmp_path / "history.jsonl"
  for epoch in (1, 2):
    loop.append_history(str(tmp_path), {"epoch": epoch, "v": epoch})
  path.write_text(path.read_text()[:-8])
  loop.append_history(str(tmp_path), {"epoch": 3, "v": 3})
  lines = path.read_text().splitlines()
  assert len(lines) == 3 and json.loads(lines[0]) == {"epoch": 1, "v": 1}
  assert json.loads(lines[2]) == {"epoch": 3, "v": 3}
  assert rundir.last_history(str(tmp_path)) == {"epoch": 3, "v": 3}


def test_chunks_end_at_every_checkpoint_step():
  # --checkpoint_every_steps=2 with chunks of 3: chunks are cut so that a
  # checkpoint is written at steps 2, 4 and 6 (not at the epoch's end, 7,
  # which the epoch's own checkpoint covers).
  step, chunks, saved = tf.Variable(0), [], []

  def run_chunk(n):
    chunks.append(n)
    return {"train/loss_sum": tf.constant(float(n)),
            "train/count": tf.constant(float(n))}
  totals = loop.run_epoch(run_chunk=run_chunk, steps=7, start=0,
                          steps_per_loop=3, checkpoint_every_steps=2,
                          step_in_epoch=step, interrupted=[],
                          save=lambda t: saved.append(t["train/count"]),
                          desc="", show_progress=False)
  assert chunks == [2, 2, 2, 1]
  assert saved == [2.0, 4.0, 6.0]
  assert totals["train/count"] == 7.0 and int(step.numpy()) == 7


class _CountingOptimizer:
  def __init__(self):
    self.iterations = tf.Variable(0, dtype=tf.int64)

  def current_lr(self):
    return 0.1 * float(self.iterations.numpy() + 1)


def _scalars(log_dir):
  events = event_accumulator.EventAccumulator(
      str(log_dir), size_guidance={"tensors": 0})
  events.Reload()
  return events


def test_a_chunk_logs_the_rate_at_its_start_and_its_mean_loss(tmp_path):
  opt = _CountingOptimizer()

  def train_loop(iterators, n):
    opt.iterations.assign_add(tf.cast(n, tf.int64))
    return {"train/loss_sum": tf.constant(6.0),
            "train/count": tf.constant(4.0)}
  writer = summaries.LazyFileWriter(str(tmp_path))
  loop.chunk_runner(train_loop, (), opt, writer)(3)
  writer.flush()
  events = _scalars(tmp_path)
  (lr,), (loss,) = events.Tensors("train/lr"), events.Tensors(
      "train/step_loss")
  assert lr.step == loss.step == 3
  assert abs(float(tf.make_ndarray(lr.tensor_proto)) - 0.1) < 1e-7
  assert float(tf.make_ndarray(loss.tensor_proto)) == 1.5


def test_arch_tags_per_group_and_candidate(tmp_path):
  from tests import helpers
  arch = helpers.tiny_context().arch
  writer = summaries.LazyFileWriter(str(tmp_path))
  summaries.write_arch(writer, arch, 5)
  writer.flush()
  tags = set(_scalars(tmp_path).Tags()["tensors"])
  for group in arch.groups:
    assert f"arch/{group.name}/entropy" in tags
    assert (f"arch/{group.name}/{group.decision}_0/{group.candidates[-1]}"
            in tags)
  assert "arch/entropy" in tags
