"""Cross-replica sums that every replica issues in the same order.

Independent collectives in one replica function (e.g. the batch statistics
of parallel MixedOp branches, or the two finite-difference passes of the
unrolled DARTS step) may be scheduled in a different order on each replica;
CPU collectives then fail with "Shape mismatch in the collective instance".
``ordered_all_reduce`` chains every collective of a traced replica function
— forward and backward — with control dependencies in creation order, which
is the same on every replica because the same Python code traces them.
"""

from __future__ import annotations

import threading
import weakref

import tensorflow as tf

# (graph, replica thread) → last collective output; graphs are held weakly.
_CHAINS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _chain_key():
  return tf.compat.v1.get_default_graph(), threading.get_ident()


def _ordered_sum(ctx, value: tf.Tensor) -> tf.Tensor:
  graph, thread = _chain_key()
  with _LOCK:
    chains = _CHAINS.setdefault(graph, {})
    last = chains.get(thread)
  with tf.control_dependencies([last] if last is not None else []):
    value = tf.identity(value)
  total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.stop_gradient(value))
  with _LOCK:
    chains[thread] = total
  return total


def ordered_all_reduce(values):
  """Sums a list of tensors over replicas as ONE ordered collective.

  Differentiable: the gradient is the ordered sum of the upstream
  gradients (the adjoint of an all-sum is an all-sum). Identity when there
  is a single replica or no replica context.
  """
  ctx = tf.distribute.get_replica_context()
  values = list(values)
  if ctx is None or ctx.num_replicas_in_sync == 1 or not values:
    return values
  shapes = [tf.shape(v) for v in values]
  sizes = [v.shape.num_elements() for v in values]
  dtype = values[0].dtype

  @tf.custom_gradient
  def packed_sum(flat):
    def grad(upstream):
      return _ordered_sum(ctx, upstream)
    return _ordered_sum(ctx, flat), grad

  flat = tf.concat([tf.reshape(tf.cast(v, dtype), [-1]) for v in values], 0)
  total = packed_sum(flat)
  out, offset = [], 0
  for v, shape, size in zip(values, shapes, sizes):
    out.append(tf.cast(tf.reshape(total[offset:offset + size], shape),
                       v.dtype))
    offset += size
  return out


_KEY_BASE_STRIDE = 100_000
# Starts at 1: strategies built directly with tf.distribute.MirroredStrategy
# (in user code or libraries) use key base 0, which this must not share.
_strategies_made = 1


def mirrored_strategy(devices=None) -> tf.distribute.MirroredStrategy:
  """A MirroredStrategy whose collectives cannot collide with earlier ones.

  Every ``MirroredStrategy`` numbers its collective groups from the same
  start, and the process-wide collective executor remembers each group's
  instances. A second strategy in one process (a notebook running two
  searches, a test file) then reuses the first one's keys and aborts with
  "Collective instance … expected type … but got …" or "Shape mismatch".
  TensorFlow's own tests avoid this by moving the class's key base for every
  new strategy; this does the same.
  """
  global _strategies_made
  with _LOCK:
    base = _strategies_made * _KEY_BASE_STRIDE
    _strategies_made += 1
    cls = tf.distribute.MirroredStrategy
    saved = cls._collective_key_base  # pylint: disable=protected-access
    cls._collective_key_base = base  # pylint: disable=protected-access
    try:
      return cls(devices)
    finally:
      cls._collective_key_base = saved  # pylint: disable=protected-access


def worker_name(strategy: tf.distribute.Strategy) -> str | None:
  """``None`` for the process that writes the run: a single process, or
  the chief of a multi-worker cluster (task ``chief``, else ``worker`` 0,
  TensorFlow's convention); otherwise the task's name, e.g. ``worker1``.
  """
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or resolver.task_type is None:
    return None
  cluster = resolver.cluster_spec().as_dict()
  task_type, task_id = resolver.task_type, resolver.task_id
  if task_type == "chief" or (task_type == "worker" and task_id == 0 and
                              "chief" not in cluster):
    return None
  return f"{task_type}{task_id}"


def local_replicas(strategy: tf.distribute.Strategy) -> int:
  """Replicas of ``strategy`` in this process."""
  return max(strategy.num_replicas_in_sync // num_workers(strategy), 1)


def num_workers(strategy: tf.distribute.Strategy) -> int:
  """Processes taking part in ``strategy`` (1 without a cluster)."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or resolver.task_type is None:
    return 1
  cluster = resolver.cluster_spec()
  return sum(cluster.num_tasks(job) for job in ("chief", "worker")
             if job in cluster.jobs)


def same_on_every_worker(strategy: tf.distribute.Strategy, key: str) -> bool:
  """Whether every worker of a multi-worker ``strategy`` passes the same
  ``key`` (True with one worker; no collective then). Every worker must
  call it at the same point: it issues two cross-worker sums.

  The key's SHA-256 is summed over the replicas in 16-bit pieces (exact in
  float32 up to 256 replicas); a worker whose pieces times the replica
  count differ from the sum sees a mismatch, and a second sum tells every
  worker whether any saw one, so that all of them answer alike.
  """
  if num_workers(strategy) <= 1:
    return True
  import hashlib  # pylint: disable=import-outside-toplevel
  digest = hashlib.sha256(key.encode()).digest()[:8]
  pieces = [int.from_bytes(digest[i:i + 2], "big") for i in range(0, 8, 2)]
  own = tf.constant(pieces, tf.float32)
  replicas = float(strategy.num_replicas_in_sync)

  @tf.function
  def total(value):
    return strategy.reduce(tf.distribute.ReduceOp.SUM,
                           strategy.run(lambda: value), axis=None)

  differs = float(not bool(tf.reduce_all(total(own) == own * replicas)))
  return float(total(tf.constant([differs]))[0]) == 0.0
