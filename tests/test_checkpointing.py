"""Search checkpoints hold every network variable (layers in lists too)."""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tests import helpers
from tfnas.spaces import darts as darts_space
from tfnas.spaces import shufflenet
from tfnas.train.checkpointing import ModelVariables


def _network(kind):
  if kind == "blocks":
    space = shufflenet.ShuffleNetSpaceConfig.small(
        stage_channels=(8, 16, 32, 64), stem_channels=4, head_channels=16,
        num_classes=3)
    return shufflenet.build_shufflenet_supernet(space, (8, 8, 3))
  return darts_space.build_search_network(helpers.tiny_space(), (8, 8, 3))


class ModelVariablesTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters("blocks", "cells")
  def test_every_variable_is_saved_and_restored(self, kind):
    net = _network(kind)
    path = tf.train.Checkpoint(network=ModelVariables(net)).save(
        self.get_temp_dir() + f"/{kind}")
    keys = tf.train.load_checkpoint(path).get_variable_to_shape_map()
    saved = [k for k in keys if k.startswith("network/")]
    self.assertLen(saved, len(net.variables))
    other = _network(kind)
    for v in other.variables:  # Different values everywhere.
      v.assign(tf.cast(tf.fill(v.shape, 7), v.dtype))
    tf.train.Checkpoint(network=ModelVariables(other)).restore(
        path).assert_consumed()
    for a, b in zip(net.variables, other.variables):
      self.assertAllEqual(np.asarray(a.numpy()), np.asarray(b.numpy()),
                          msg=a.path)


if __name__ == "__main__":
  tf.test.main()
