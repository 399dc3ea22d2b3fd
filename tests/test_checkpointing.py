"""Search checkpoints hold every network variable (layers in lists too);
a checkpoint that does not fit is explained in one line."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tests import helpers
from tfnas.spaces import darts as darts_space
from tfnas.spaces import shufflenet
from tfnas.train.checkpointing import ModelVariables, restore_problem


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


def _dense_stack(*units, inputs=4):
  model = keras.Sequential([keras.layers.Dense(u) for u in units])
  model.build((None, inputs))
  return model


class RestoreProblemTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    saved = _dense_stack(3)
    for v in saved.variables:
      v.assign(tf.fill(v.shape, 3.0))
    self.path = tf.train.Checkpoint(network=ModelVariables(saved)).save(
        self.get_temp_dir() + "/dense")

  def test_a_fitting_checkpoint_is_restored(self):
    target = _dense_stack(3)
    self.assertIsNone(restore_problem(self.path,
                                      network=ModelVariables(target)))
    self.assertAllEqual(target.variables[0], tf.fill((4, 3), 3.0))

  def test_another_shape_is_one_line_and_restores_nothing(self):
    wider = _dense_stack(5)
    before = [v.numpy() for v in wider.variables]
    problem = restore_problem(self.path, network=ModelVariables(wider))
    self.assertRegex(problem, r"^network/values/v0000[01] has shape "
                              r"\((4, )?3,?\) there, \((4, )?5,?\) here")
    for v, value in zip(wider.variables, before):
      self.assertAllEqual(v, value)

  def test_missing_variables_are_counted(self):
    deeper = _dense_stack(3, 2)
    problem = restore_problem(self.path, network=ModelVariables(deeper))
    self.assertStartsWith(problem, "it holds no value for 2 variables")


if __name__ == "__main__":
  tf.test.main()
