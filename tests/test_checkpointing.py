"""Search checkpoints hold every network variable (layers in lists too);
a checkpoint that does not fit is explained in one line; a resume skips
unreadable checkpoints for the newest one that reads."""

import glob
import json
import os

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tests import helpers
from tfnas.spaces import darts as darts_space
from tfnas.spaces import shufflenet
from tfnas.errors import TfnasError
from tfnas.train import rundir
from tfnas.train.checkpointing import (ModelVariables, checkpoint_list,
                                       checkpoint_progress,
                                       existing_checkpoints,
                                       resolve_checkpoint, restore_latest,
                                       restore_problem)


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

  def test_a_truncated_data_file_is_one_line(self):
    data = glob.glob(self.path + ".data-*")[0]
    with open(data, "r+b") as f:
      f.truncate(10)
    problem = restore_problem(self.path,
                              network=ModelVariables(_dense_stack(3)))
    self.assertIsNotNone(problem)
    self.assertNotIn("\n", problem)


class RestoreLatestTest(tf.test.TestCase):
  """Resuming: the newest checkpoint that reads and fits."""

  def setUp(self):
    super().setUp()
    self.dir = os.path.join(self.get_temp_dir(), "ckpt")
    self.model = _dense_stack(3)
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(network=ModelVariables(self.model)), self.dir,
        max_to_keep=3)
    self.paths = []
    for value in (1.0, 2.0, 3.0):
      for v in self.model.variables:
        v.assign(tf.fill(v.shape, value))
      self.paths.append(manager.save())

  def _restore(self, model):
    return restore_latest(tf.train.Checkpoint(network=ModelVariables(model)),
                          self.dir)

  def test_the_newest_is_restored(self):
    target = _dense_stack(3)
    self.assertEqual(self._restore(target), self.paths[-1])
    self.assertAllEqual(target.variables[0], tf.fill((4, 3), 3.0))

  def test_an_empty_directory_has_nothing_to_restore(self):
    empty = os.path.join(self.get_temp_dir(), "empty")
    self.assertIsNone(restore_latest(
        tf.train.Checkpoint(network=ModelVariables(_dense_stack(3))), empty))

  def test_unreadable_checkpoints_give_way_to_the_newest_readable(self):
    # The newest cut short, the one before lost its data file: the oldest
    # is restored (with a warning), not a traceback.
    with open(glob.glob(self.paths[2] + ".data-*")[0], "r+b") as f:
      f.truncate(10)
    for name in glob.glob(self.paths[1] + ".data-*"):
      os.remove(name)
    target = _dense_stack(3)
    with self.assertLogs(level="WARNING") as logs:
      self.assertEqual(self._restore(target), self.paths[0])
    self.assertAllEqual(target.variables[0], tf.fill((4, 3), 1.0))
    self.assertLen([r for r in logs.output if "cannot be read" in r], 2)
    # They left the checkpoint list (their files stay): a manager made now
    # keeps the restored one as its oldest, not the unreadable ones.
    state = tf.train.get_checkpoint_state(self.dir)
    self.assertEqual(list(state.all_model_checkpoint_paths), [self.paths[0]])
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(network=ModelVariables(target)), self.dir,
        max_to_keep=3)
    self.assertEqual(manager.checkpoints, [self.paths[0]])
    self.assertTrue(os.path.exists(self.paths[2] + ".index"))

  def test_a_damaged_or_lost_list_falls_back_on_the_files(self):
    # Resuming from "no checkpoint" would start the run again from scratch
    # (an emptied list was a ValueError traceback).
    for damage in ("garbage {", "", None):
      list_file = os.path.join(self.dir, "checkpoint")
      if damage is None:
        os.remove(list_file)
      else:
        with open(list_file, "w") as f:
          f.write(damage)
      target = _dense_stack(3)
      with self.assertLogs(level="WARNING") as logs:
        self.assertEqual(self._restore(target), self.paths[-1])
      self.assertAllEqual(target.variables[0], tf.fill((4, 3), 3.0))
      self.assertTrue(any("ckpt-1, ckpt-2, ckpt-3" in r for r in logs.output))
      self.assertEqual(
          resolve_checkpoint(os.path.dirname(self.dir), None, "-"),
          self.paths[-1])
      # The list was written anew: the run's manager reads it.
      manager = tf.train.CheckpointManager(
          tf.train.Checkpoint(network=ModelVariables(target)), self.dir,
          max_to_keep=3)
      self.assertEqual(manager.checkpoints, self.paths)

  def test_a_damaged_list_without_checkpoint_files_is_removed(self):
    for path in self.paths:
      for name in glob.glob(path + ".*"):
        os.remove(name)
    with open(os.path.join(self.dir, "checkpoint"), "w") as f:
      f.write("")
    self.assertIsNone(self._restore(_dense_stack(3)))
    self.assertFalse(os.path.exists(os.path.join(self.dir, "checkpoint")))

  def test_no_readable_checkpoint_is_an_error(self):
    for path in self.paths:
      os.remove(path + ".index")
    with self.assertRaisesRegex(TfnasError, "no checkpoint in .* can be "
                                            "read"):
      self._restore(_dense_stack(3))

  def test_export_names_a_checkpoint_by_its_prefix_or_one_of_its_files(self):
    run = os.path.dirname(self.dir)
    self.assertEqual(resolve_checkpoint(run, None, "train first"),
                     self.paths[-1])
    for name in (self.paths[0] + ".index",
                 glob.glob(self.paths[0] + ".data-*")[0], self.paths[0]):
      self.assertEqual(resolve_checkpoint(run, name, "-"), self.paths[0])

  def test_existing_checkpoints_are_those_with_files(self):
    self.assertEqual(existing_checkpoints(self.dir), self.paths)
    for f in glob.glob(self.paths[1] + ".*"):
      os.remove(f)  # Still named by the list.
    self.assertEqual(existing_checkpoints(self.dir),
                     [self.paths[0], self.paths[2]])
    self.assertEqual(existing_checkpoints(self.dir + "/none"), [])

  def test_a_missing_checkpoint_names_those_kept(self):
    # A checkpoint rotated away (max_to_keep) is asked for by its number.
    gone = os.path.join(self.dir, "ckpt-0")
    with self.assertRaisesRegex(
        TfnasError, r"ckpt-0 not found \(no ckpt-0.index\); .*ckpt holds "
                    r"ckpt-1, ckpt-2, ckpt-3$"):
      resolve_checkpoint(os.path.dirname(self.dir), gone, "-")

  def test_export_of_an_unreadable_checkpoint_names_the_older_ones(self):
    with open(glob.glob(self.paths[2] + ".data-*")[0], "r+b") as f:
      f.truncate(10)
    with self.assertRaisesRegex(
        TfnasError, r"ckpt-3 cannot be read \(.*\); pass an older one with "
                    r"--checkpoint: .*ckpt-1, .*ckpt-2$"):
      resolve_checkpoint(os.path.dirname(self.dir), None, "-")

  def test_another_network_is_an_error_without_trying_older_ones(self):
    wider = _dense_stack(5)
    before = [v.numpy() for v in wider.variables]
    with self.assertRaisesRegex(
        TfnasError, r"cannot resume from .*ckpt-3: .* has shape .*start a "
                    r"new --run_dir"):
      self._restore(wider)
    for v, value in zip(wider.variables, before):
      self.assertAllEqual(v, value)


class CheckpointProgressTest(tf.test.TestCase):
  """Which epoch a checkpoint belongs to (what an export reports with it)."""

  def test_epoch_and_step_of_a_run_checkpoint_and_its_history_line(self):
    directory = self.get_temp_dir()
    epoch = tf.Variable(0, dtype=tf.int64)
    step_in_epoch = tf.Variable(0, dtype=tf.int64)
    checkpoint = tf.train.Checkpoint(epoch=epoch, step_in_epoch=step_in_epoch)
    epoch.assign(2)
    at_end = checkpoint.save(os.path.join(directory, "end"))
    step_in_epoch.assign(5)
    mid = checkpoint.save(os.path.join(directory, "mid"))
    self.assertEqual(checkpoint_progress(at_end), (2, 0))
    self.assertEqual(checkpoint_progress(mid), (2, 5))
    other = tf.train.Checkpoint(w=tf.Variable(1.0)).save(
        os.path.join(directory, "other"))
    self.assertIsNone(checkpoint_progress(other))

    with open(os.path.join(directory, "history.jsonl"), "w") as f:
      for line in ({"epoch": 1, "val/acc": 0.1}, {"epoch": 2, "val/acc": 0.2},
                   {"epoch": 3, "val/acc": 0.3}, {"epoch": 2, "val/acc": 0.25}):
        f.write(json.dumps(line) + "\n")
      f.write("not json\n")
    with open(os.path.join(directory, "history.jsonl"), "ab") as f:
      f.write(b"\xff\xfe not UTF-8\n")
    # The latest line of the epoch (an epoch repeated after a resume).
    self.assertEqual(rundir.epoch_history(directory, 2)["val/acc"], 0.25)
    self.assertEqual(rundir.epoch_history(directory, 1)["val/acc"], 0.1)
    self.assertEqual(rundir.epoch_history(directory, 7), {})
    self.assertEqual(rundir.epoch_history(self.get_temp_dir() + "/none", 1),
                     {})
    self.assertEqual(rundir.last_history(directory)["epoch"], 2)


if __name__ == "__main__":
  tf.test.main()


class NumberOrderTest(tf.test.TestCase):

  def test_a_lost_list_restores_the_highest_number(self):
    directory = os.path.join(self.get_temp_dir(), "ckpt")
    model = _dense_stack(3)
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(network=ModelVariables(model)), directory,
        max_to_keep=6)
    # Saved out of order: neither name nor creation order is number order.
    for number in (3, 11, 1, 12, 2, 10):
      for v in model.variables:
        v.assign(tf.fill(v.shape, float(number)))
      manager.save(checkpoint_number=number)
    os.remove(os.path.join(directory, "checkpoint"))
    _, paths = checkpoint_list(directory)
    self.assertEqual([os.path.basename(p) for p in paths],
                     [f"ckpt-{n}" for n in (1, 2, 3, 10, 11, 12)])
    target = _dense_stack(3)
    restored = restore_latest(
        tf.train.Checkpoint(network=ModelVariables(target)), directory)
    self.assertEqual(os.path.basename(restored), "ckpt-12")
    self.assertAllEqual(target.variables[0], tf.fill((4, 3), 12.0))
