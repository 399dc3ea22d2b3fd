"""Freeing the eager kernels a supernet's build call leaves behind.

A supernet creates its variables in one eager call that runs every op of
every edge once, inline (`build_search_network`, `build_shufflenet_supernet`).
TensorFlow's eager context caches one kernel per distinct op and attribute
set it ran, and the initialisers' random ops each carry their own seeds:
thousands of kernels that no later step uses (~70 MiB for the DARTS supernet
at C=16, 8 cells). The cache also holds the instantiations of functions
called eagerly (traced steps, shared functions): a build after steps have
run makes those instantiate again on their next call, as on their first.
An eager op's kernel is likewise created again on its next call.
"""

from __future__ import annotations

import tensorflow as tf
# The public API has no way to drop the eager kernel cache; TF's own tests
# reach it the same way.
from tensorflow.python.eager import context


def release_build_kernels() -> bool:
  """Clears the eager kernel cache; False (nothing done) inside a graph.

  Also resets stateful eager kernels: an eager random op called again with
  the same explicit op seed restarts its sequence, as in a fresh process.
  """
  if not tf.executing_eagerly():
    return False
  context.context().clear_kernel_cache()
  return True
