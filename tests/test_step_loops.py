"""The compiled step loops trace step code as written (no autograph)."""

import pytest
import tensorflow as tf

from tfnas.train import step_loops


def _dataset(values):
  return tf.data.Dataset.from_tensor_slices(tf.constant(values, tf.float32))


def _branching_step(x):
  # Autograph would rewrite this into a tf.cond; traced as written, a
  # tensor cannot be a Python bool.
  if x > 0:
    return {"loss": x}
  return {"loss": -x}


def test_chunk_loop_runs_its_steps_and_sums_them():
  strategy = tf.distribute.get_strategy()
  loop = step_loops.compiled_step_loop(
      strategy, ["loss"], lambda x: {"loss": x * x, "unused": x})
  it = iter(_dataset([1.0, 2.0, 3.0, 4.0]))
  out = loop((it,), tf.constant(3))
  assert out.keys() == {"loss"}
  assert float(out["loss"]) == 14.0
  assert float(loop((it,), tf.constant(1))["loss"]) == 16.0


@pytest.mark.parametrize("kind", ["chunk", "replica_step", "eval"])
def test_step_code_is_not_converted_by_autograph(kind):
  strategy = tf.distribute.get_strategy()
  if kind == "chunk":
    loop = step_loops.compiled_step_loop(strategy, ["loss"], _branching_step)
    run = lambda: loop((iter(_dataset([1.0, 2.0])),), tf.constant(2))
  elif kind == "replica_step":
    step = step_loops.compiled_replica_step(strategy, _branching_step)
    run = lambda: step((tf.constant(1.0),))
  else:
    step = tf.function(step_loops.summed_eval_step(
        strategy, lambda images, labels: _branching_step(images[0])))
    run = lambda: step((tf.constant([1.0]), tf.constant([0])))
  with pytest.raises(tf.errors.OperatorNotAllowedInGraphError):
    run()


def test_a_step_written_with_graph_control_flow_runs():
  def step(x):
    return {"loss": tf.cond(x > 0, lambda: x, lambda: -x)}
  strategy = tf.distribute.get_strategy()
  loop = step_loops.compiled_step_loop(strategy, ["loss"], step)
  out = loop((iter(_dataset([1.0, -2.0])),), tf.constant(2))
  assert float(out["loss"]) == 3.0
  run = step_loops.compiled_replica_step(strategy, step)
  assert float(run((tf.constant(-5.0),))["loss"]) == 5.0


def test_the_evaluation_step_counts_a_last_batch_of_one_example():
  # Only an empty replica batch is skipped (CPU kernels mis-shape those).
  def replica(images, labels):
    return step_loops.eval_metrics(tf.reduce_sum(images),
                                   tf.one_hot(labels, 3), labels)
  step = tf.function(step_loops.summed_eval_step(
      tf.distribute.get_strategy(), replica))
  batches = tf.data.Dataset.from_tensor_slices(
      (tf.ones([5, 2]), tf.range(5) % 3)).batch(4)  # Batches of 4 and 1.
  assert [float(step(b)["eval/count"]) for b in batches] == [4.0, 1.0]


@pytest.mark.parametrize("mirrored", [False, True])
def test_the_evaluation_step_is_traced_once_for_a_partial_last_batch(
    mirrored):
  strategy = (tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
              if mirrored else tf.distribute.get_strategy())
  traces = []

  def replica(images, labels):
    traces.append(images.shape)
    return step_loops.eval_metrics(tf.reduce_sum(images),
                                   tf.one_hot(tf.zeros_like(labels), 3),  # Class 0.
                                   labels)
  step = step_loops.compiled_eval_step(strategy, replica)

  def dataset():  # Batches of 4, 4 and 2 (global).
    return strategy.distribute_datasets_from_function(
        lambda ctx: tf.data.Dataset.from_tensor_slices(
            (tf.range(10, dtype=tf.float32)[:, None] * tf.ones([1, 2]),
             tf.range(10) % 3)).batch(ctx.get_per_replica_batch_size(4)))
  for _ in range(2):  # Another epoch's dataset of the same spec.
    metrics = step_loops.evaluate(dataset(), step)
    assert metrics["val/acc"] == pytest.approx(0.4)
    assert metrics["val/loss"] == pytest.approx(2 * 45 / 10)
  replicas = strategy.num_replicas_in_sync
  assert len(traces) == replicas  # One trace, whatever the batch size.
  assert all(shape[0] is None for shape in traces)
