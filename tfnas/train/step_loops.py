"""Step loops and evaluation: how a loop runs its steps and measures.

A step loop is ``train_loop(iterators, num_steps) -> metric sums``: each of
its ``num_steps`` steps takes one batch from every iterator (a ``None``
iterator gives a ``None`` batch) and runs the replica step on them; the
result sums each key of ``keys`` over replicas and steps.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import tensorflow as tf

from tfnas.train.progress import progress_bar
from tfnas.train.step import batch_sums, cross_entropy
from tfnas.train.stopping import stop_requested


def as_written(fn: Callable) -> Callable:
  """``fn`` to be traced as written: autograph does not convert it, nor
  anything it calls.

  A step function is plain Python over the network's static structure;
  tensors choose through ``tf.cond`` / ``tf.switch_case`` where they must.
  Inside an autograph-converted ``tf.function`` (a chunk's ``tf.range``
  loop) ``strategy.run`` would otherwise convert the library functions the
  step calls directly (estimators, ``StepContext``, optimizers,
  distributions: ~40 functions, ~400 conversions per trace; Keras layers
  and TFP are never converted): ~2.5 s of every process's first trace, for
  the same graph (WORKSPACE_NOTES.md, "Stop 32"). Python control flow on a
  tensor in step code then fails loudly at trace time instead of being
  converted. A nested ``tf.function`` with autograph on would still convert
  its own body: the library's are traced with ``autograph=False``.
  """
  return tf.autograph.experimental.do_not_convert(fn)


def _next_batches(iterators: tuple) -> tuple:
  return tuple(next(it) if it is not None else None for it in iterators)


def _replica_sums(strategy, per_replica, keys) -> dict:
  return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica[k],
                             axis=None) for k in keys}


def compiled_step_loop(strategy: tf.distribute.Strategy, keys: Sequence[str],
                       replica_step: Callable[..., Mapping[str, tf.Tensor]]):
  """All steps of a chunk in one ``tf.function`` call (``tf.range`` loop).

  ``replica_step(*batches)`` runs on every replica and returns its metric
  sums (at least ``keys``).
  """
  keys = tuple(keys)
  replica_step = as_written(replica_step)

  @tf.function
  def train_loop(iterators, num_steps):
    totals = tuple(tf.constant(0.0) for _ in keys)
    for _ in tf.range(num_steps):  # Autograph makes this a graph loop.
      per_replica = strategy.run(replica_step,
                                 args=_next_batches(iterators))
      sums = _replica_sums(strategy, per_replica, keys)
      totals = tuple(t + sums[k] for t, k in zip(totals, keys))
    return dict(zip(keys, totals))
  return train_loop


def compiled_replica_step(strategy: tf.distribute.Strategy,
                          replica_step: Callable[..., Mapping[str, tf.Tensor]]):
  """``run(batches)``: ``replica_step(*batches)`` on every replica in one
  ``tf.function``; returns every key it returns, summed over replicas.

  Batches come in as arguments: a batch of another size (a stream that
  keeps its last partial batch) must not retrace a supernet step more than
  once.
  """
  replica_step = as_written(replica_step)

  @tf.function(reduce_retracing=True, autograph=False)
  def run(batches):
    per_replica = strategy.run(replica_step, args=batches)
    return _replica_sums(strategy, per_replica, per_replica.keys())
  return run


def phased_step_loop(strategy: tf.distribute.Strategy, keys: Sequence[str],
                     phases: Sequence[Callable[..., Mapping[str, tf.Tensor]]]):
  """One ``tf.function`` per phase of a step, called in order every step.

  The batches are taken once per step, in Python, and passed to every phase
  (``phase(*batches)`` on every replica; a phase returns the metric sums it
  measured, the keys are summed over phases). Each phase is its own graph,
  so TF optimises and holds memory for one phase at a time.
  """
  compiled = [compiled_replica_step(strategy, p) for p in phases]

  def train_loop(iterators, num_steps):
    totals = {k: tf.constant(0.0) for k in keys}
    for _ in range(int(num_steps)):
      batches = _next_batches(iterators)
      for run in compiled:
        for k, v in run(batches).items():
          totals[k] += v
    return totals
  return train_loop


def eager_step_loop(strategy: tf.distribute.Strategy, keys: Sequence[str],
                    replica_step: Callable[..., Mapping[str, tf.Tensor]],
                    step_args: Callable[[], tuple] = tuple,
                    after_step: Callable[[], None] | None = None,
                    compiled_for: Callable[..., Callable | None] | None = None):
  """Steps run from Python without ``tf.function`` (single-path methods
  choose each step's child with Python values).

  Every step calls ``replica_step(*batches, *step_args())`` on every
  replica, then ``after_step()``; ``step_args`` is evaluated once per step,
  before the replicas run. When ``compiled_for(*step_args())`` returns a
  `compiled_replica_step` (e.g. the traced step of a child met before), the
  step runs that on the batches instead.
  """
  def train_loop(iterators, num_steps):
    totals = dict.fromkeys(keys, 0.0)
    for _ in range(int(num_steps)):
      batches = _next_batches(iterators)
      extra = tuple(step_args())
      run = compiled_for(*extra) if compiled_for is not None else None
      if run is not None:
        sums = run(batches)
      else:
        per_replica = strategy.run(replica_step, args=batches + extra)
        sums = _replica_sums(strategy, per_replica, keys)
      for k in keys:
        totals[k] += float(sums[k])
      if after_step is not None:
        after_step()
    return totals
  return train_loop


EVAL_KEYS = ("eval/loss_sum", "eval/correct", "eval/count")


def eval_metrics(loss_sum, logits, labels) -> dict[str, tf.Tensor]:
  """Per-replica sums of one evaluation batch (``EVAL_KEYS``)."""
  return batch_sums("eval", loss_sum, logits, labels)


def summed_eval_step(strategy: tf.distribute.Strategy,
                     replica_fn: Callable[[tf.Tensor, tf.Tensor],
                                          Mapping[str, tf.Tensor]]):
  """``step(batch)``: ``replica_fn`` on every replica, sums over replicas.

  ``replica_fn(images, labels)`` returns :func:`eval_metrics`. A replica
  whose share of the last, partial batch is empty returns zeros without
  running the network (some CPU kernels mis-shape zero-size batches).
  """
  def guarded(images, labels):
    def empty():
      return {k: tf.constant(0.0) for k in EVAL_KEYS}
    if tf.executing_eagerly():
      if int(tf.shape(labels)[0]) == 0:
        return empty()
      return replica_fn(images, labels)
    return tf.cond(tf.shape(labels)[0] > 0,
                   lambda: replica_fn(images, labels), empty)

  guarded = as_written(guarded)

  def step(batch):
    per_replica = strategy.run(guarded, args=batch)
    return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
            for k, v in per_replica.items()}
  return step


class EvalStep:
  """A summed evaluation step compiled for the dataset it runs on.

  ``on(dataset)`` is ``step`` as a ``tf.function`` whose input signature is
  ``dataset.element_spec``. Evaluation datasets keep their last, partial
  batch, so their batch dimension is None and that batch runs the graph
  traced for the full ones; a plain ``tf.function`` would trace the step a
  second time for it (seconds per evaluation kind and process). A dataset
  of another spec gets its own function.
  """

  def __init__(self, step: Callable):
    self._step = step
    self._spec = None
    self._function = None

  def on(self, dataset) -> Callable:
    spec = dataset.element_spec
    if self._function is None or spec != self._spec:
      self._spec = spec
      self._function = tf.function(self._step, input_signature=[spec])
    return self._function


def compiled_eval_step(strategy: tf.distribute.Strategy,
                       replica_fn: Callable[[tf.Tensor, tf.Tensor],
                                            Mapping[str, tf.Tensor]]
                       ) -> EvalStep:
  """:func:`summed_eval_step` compiled as an :class:`EvalStep`."""
  return EvalStep(summed_eval_step(strategy, replica_fn))


def model_eval_step(strategy: tf.distribute.Strategy, model) -> EvalStep:
  """The compiled evaluation step of a Keras ``model`` called in inference
  mode (moving BN statistics): summed cross-entropy and correct answers."""
  def replica(images, labels):
    logits = model(images, training=False)
    return eval_metrics(tf.reduce_sum(cross_entropy(logits, labels)), logits,
                        labels)
  return compiled_eval_step(strategy, replica)


def evaluate(dataset, step, prefix: str = "val/", show_progress: bool = False,
             batches: int | None = None,
             interrupted: list | None = None) -> dict[str, float]:
  """Runs ``step`` (a callable or an :class:`EvalStep`) over a
  (distributed) dataset; mean loss and accuracy.

  ``show_progress`` draws a bar over the ``batches`` (None: counted) that is
  erased when the evaluation ends. ``interrupted`` (the list of
  `sigterm_flag`; only where one process runs the evaluation, since the
  workers of a multi-worker run must stop at the same batch) is checked
  between batches: a stop request raises `StopRequested` there instead of
  waiting for the evaluation to end.
  """
  if isinstance(step, EvalStep):
    step = step.on(dataset)
  totals = dict.fromkeys(EVAL_KEYS, 0.0)
  with progress_bar(batches, desc=prefix.rstrip("/_") or "eval",
                    enabled=show_progress, leave=False, unit="batch") as bar:
    for batch in dataset:
      if interrupted:
        raise stop_requested(interrupted)
      for k, v in step(batch).items():
        totals[k] += float(v)
      bar.update(1)
  count = max(totals["eval/count"], 1.0)
  return {prefix + "loss": totals["eval/loss_sum"] / count,
          prefix + "acc": totals["eval/correct"] / count}
