"""Retraining a derived network from scratch (the evaluation recipe).

    for epoch:                                  (eager, between loops)
      drop_path_prob = final * epoch / epochs
      for chunk of steps_per_loop steps:        (one tf.function call)
        strategy.run(step, batch)               (CE + aux_weight * CE_aux)
      evaluate on the test split, TensorBoard, checkpoint, history.jsonl

The run directory, checkpointing (epoch and step in epoch), progress bars
and history come from ``tfnas.train.loop``, stop requests from
``tfnas.train.stopping`` and the step loop from ``tfnas.train.step_loops``,
shared with the search loop. The run directory also receives
``genotype.json`` (the architecture being trained) so that ``tfnas-export``
can rebuild the network from the directory alone.
"""

from __future__ import annotations

import dataclasses
import os
import time

from absl import logging as log
import keras
import tensorflow as tf

from tfnas import cost
from tfnas import data as data_lib
from tfnas import dataset_names
from tfnas import genotypes
from tfnas import models
from tfnas.config import TrainConfig
from tfnas.distribute import ordered_all_reduce
from tfnas.genotype import Genotype
from tfnas.layers.batch_norm import synchronized_batch_norm
from tfnas.train import (loop, optim, rundir, schedules, step_loops, stopping,
                         summaries)
from tfnas.train.checkpointing import existing_checkpoints
from tfnas.train.step import StepContext, batch_sums, cross_entropy


@dataclasses.dataclass
class TrainResult:
  history: list  # One dict of epoch metrics per epoch.
  cost: cost.NetworkCost


def load_genotype(config: TrainConfig, resuming: bool) -> Genotype:
  """The run's genotype: its saved copy when resuming, else ``--genotype``.

  Raises:
    RunDirError: resuming a run that holds checkpoints but lost its
      genotype.json: which network they hold is not known (``--genotype``
      may name a file changed since; a checkpoint of another genotype
      can even restore without error when its shapes happen to line up).
  """
  saved = os.path.join(config.run_dir, "genotype.json")
  if resuming and os.path.exists(saved):
    return Genotype.load(saved)
  if resuming and existing_checkpoints(os.path.join(config.run_dir, "ckpt")):
    raise rundir.RunDirError(
        f"{saved} is missing, so the network its checkpoints hold is not "
        f"known; put back the genotype the run started with or start a new "
        f"--run_dir")
  genotype = genotypes.resolve(config.genotype)
  unfinished = _unfinished_search(config.genotype)
  if unfinished:
    log.warning("--genotype=%s: %s", config.genotype, unfinished)
  return genotype


def _unfinished_search(spec: str) -> str | None:
  """What to say when ``spec`` (a run directory or its genotype.json) is
  the genotype of a search that stopped before its last epoch: the
  genotype is the one the search held when it stopped."""
  if spec in genotypes.PUBLISHED:  # Not a path, even if a folder is so named.
    return None
  folder = spec if os.path.isdir(spec) else os.path.dirname(spec) or "."
  try:
    saved = rundir.read_config(folder)
  except rundir.RunDirError:  # Not in a run directory.
    return None
  planned = saved.get("epochs")
  done = rundir.last_history(folder).get("epoch", 0)
  if (rundir.run_kind(saved) != "tfnas-search" or
      not isinstance(planned, int) or not isinstance(done, int) or
      done >= planned):
    return None
  return (f"the search in {folder} finished {done} of its {planned} epochs, "
          f"so this is the genotype it held when it stopped (tfnas-search "
          f"--resume finishes it)")


def build_network(config: TrainConfig, genotype: Genotype,
                  info: data_lib.DatasetInfo) -> models._EvalNetwork:
  """The evaluation network a config describes (also used by export)."""
  with synchronized_batch_norm(config.sync_batch_norm):
    return models.build_network(
        config.network, genotype, info.input_shape, info.num_classes,
        config.num_cells, config.channels,
        auxiliary=config.auxiliary_weight > 0)


#: How a retraining's config.json and a resume's flags compare
#: (`rundir.prepare`).
_RESUME_RULES = dict(allowed_changes=TrainConfig.RESUMABLE_CHANGES,
                     defaults=TrainConfig().to_dict(),
                     normalize=dataset_names.by_content,
                     check_saved=data_lib.check_saved_dataset)


class Retrain:
  """A retraining run: builds everything under a strategy and runs the loop.

  Args:
    config: the frozen train config.
    strategy: a ``tf.distribute`` strategy (default strategy if None).
    resume: continue from the last checkpoint of ``config.run_dir``.
    show_progress: draw a progress bar per epoch and per evaluation.
  """

  def __init__(self, config: TrainConfig, strategy=None, resume=False,
               show_progress=True):
    if resume and rundir.has_run(config.run_dir):
      # Flags other than the run's are named before anything they load
      # (e.g. another --dataset or --genotype) can fail.
      rundir.resumable_config(config.run_dir, config.to_dict(),
                              **_RESUME_RULES)
    self.config = config
    self.strategy = strategy or tf.distribute.get_strategy()
    self.show_progress = show_progress
    self.info = data_lib.dataset_info(config.dataset)
    for warning in models.size_warnings(config.network,
                                        self.info.image_size,
                                        config.num_cells):
      log.warning("%s", warning)
    # Bad genotypes and data fail before the run directory is touched.
    has_saved = resume and os.path.exists(
        os.path.join(config.run_dir, "genotype.json"))
    self.genotype = load_genotype(config, resume)
    self.cost = cost.network_cost(
        self.genotype, config.network, self.info.input_shape,
        self.info.num_classes, config.num_cells, config.channels)
    load = dict(data_dir=config.data_dir, manual_dir=config.manual_dir)
    self.train = data_lib.open_split(config.dataset, "train", **load)
    self.test = data_lib.open_split(config.dataset, "test", **load)
    loop.check_same_data(self.strategy, self.info, self.train, self.test)
    steps = self.train.num_examples // config.batch_size
    if steps < 1:
      raise data_lib.DataError(
          f"--batch_size={config.batch_size} is larger than the training "
          f"split ({self.train.num_examples} examples)")
    if config.max_steps_per_epoch:
      steps = min(steps, config.max_steps_per_epoch)
    self.steps_per_epoch = steps
    self.augment = data_lib.AugmentConfig.of_run(config,
                                                 self.info.image_size)
    self.resuming, self.write_dir = loop.open_run(
        self.strategy, config.run_dir, resume, lambda: rundir.prepare(
            config.run_dir, config.to_dict(), resume, respelled=("dataset",),
            **_RESUME_RULES))
    loop.save_dataset_record(self.write_dir, self.info)
    self._build()
    if not has_saved:
      # After the build: a resume whose checkpoint does not fit this
      # genotype fails there and leaves the run's files as they were.
      self.genotype.save(os.path.join(self.write_dir, "genotype.json"))

  # ------------------------------------------------------------------ build
  def _build(self):
    config, steps = self.config, self.steps_per_epoch
    keras.utils.set_random_seed(config.seed)
    if config.lr_schedule == "cosine":
      schedule = schedules.cosine_schedule(config.lr, config.lr_min,
                                           config.epochs, steps)
    else:
      schedule = schedules.exponential_schedule(config.lr, config.lr_decay,
                                                steps)
    with self.strategy.scope():
      self.network = build_network(config, self.genotype, self.info)
      self.optimizer = optim.SGD(schedule, momentum=config.momentum,
                                 weight_decay=config.weight_decay,
                                 clip_norm=config.grad_clip or None,
                                 name="sgd")
      self.optimizer.build(self.network.trainable_variables)
      self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
      self.step_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
    self.checkpoint = tf.train.Checkpoint(
        network=self.network, optimizer=self.optimizer, epoch=self.epoch,
        step_in_epoch=self.step_in_epoch)
    self.manager = loop.checkpoint_manager(
        self.checkpoint, self.write_dir, self.resuming,
        restore_dir=config.run_dir,
        described_by="config.json or genotype.json")
    self._train_loop = self._make_train_loop()
    self._eval_step = step_loops.model_eval_step(self.strategy, self.network)
    self.writer = summaries.LazyFileWriter(
        os.path.join(self.write_dir, "tb"),
        start_step=int(self.optimizer.iterations.numpy()) + 1)
    self._agree = stopping.stop_agreement(self.strategy)

  def _stream(self, split, training, epoch=0, skip=0):
    return split.distribute(
        self.strategy, batch_size=self.config.batch_size, training=training,
        epoch=epoch, seed=self.config.seed, augment=self.augment,
        skip_batches=skip, drop_remainder=training)

  def _make_train_loop(self):
    config, strategy, net = self.config, self.strategy, self.network
    optimizer = self.optimizer
    aux_weight = config.auxiliary_weight
    global_batch = float(config.batch_size)
    keys = ("train/loss_sum", "train/correct", "train/count")

    def step(images, labels):
      replica = tf.distribute.get_replica_context().replica_id_in_sync_group
      seed = tf.stack([tf.cast(config.seed, tf.int64),
                       optimizer.iterations * 1024 + tf.cast(replica,
                                                             tf.int64)])
      variables = net.trainable_variables
      with tf.GradientTape() as tape:
        out = net(images, training=True, drop_seed=seed)
        logits, aux_logits = out if isinstance(out, tuple) else (out, None)
        ce = tf.reduce_sum(cross_entropy(logits, labels,
                                         config.label_smoothing))
        loss = ce / global_batch
        if aux_logits is not None:
          aux = tf.reduce_sum(cross_entropy(aux_logits, labels,
                                            config.label_smoothing))
          loss += aux_weight * aux / global_batch
      grads = StepContext.gradients(tape, loss, variables)
      optimizer.apply(ordered_all_reduce(grads), variables)
      return batch_sums("train", ce, logits, labels)

    return step_loops.compiled_step_loop(strategy, keys,
                                         lambda batch: step(*batch))

  # ------------------------------------------------------------------- run
  def evaluate(self, interrupted: list | None = None) -> dict[str, float]:
    """Loss and accuracy on the test split (moving BN statistics);
    ``interrupted`` as for `step_loops.evaluate`."""
    return step_loops.evaluate(
        self._stream(self.test, training=False), self._eval_step,
        show_progress=self.show_progress,
        batches=data_lib.steps_per_epoch(self.test.num_examples,
                                         self.config.batch_size,
                                         drop_remainder=False),
        interrupted=interrupted)

  def _save(self, totals=None):
    loop.save_checkpoint(self.manager, self.write_dir,
                         self.optimizer.iterations, self.epoch, totals)

  def run(self, stop_after_epochs: int | None = None) -> TrainResult:
    """Runs the remaining epochs (or only ``stop_after_epochs`` of them)."""
    history = loop.run_epochs(
        strategy=self.strategy, epoch=self.epoch, epochs=self.config.epochs,
        run_epoch=self._run_epoch, save=self._save, agree=self._agree,
        writer=self.writer, run_dir=self.config.run_dir,
        stop_after_epochs=stop_after_epochs)
    return TrainResult(history, self.cost)

  def _run_epoch(self, interrupted) -> dict:
    config, steps = self.config, self.steps_per_epoch
    epoch = int(self.epoch.numpy())
    start = int(self.step_in_epoch.numpy())
    drop_prob = config.drop_path_prob * epoch / config.epochs
    self.network.drop_path_prob.assign(drop_prob)
    iterator = iter(self._stream(self.train, True, epoch,
                                 start))
    t0 = time.time()
    before = loop.resumed_totals(
        config.run_dir, int(self.optimizer.iterations.numpy()), epoch, start)

    totals = loop.run_epoch(
        run_chunk=loop.chunk_runner(
            self._train_loop, (iterator,), self.optimizer, self.writer),
        steps=steps, start=start,
        steps_per_loop=config.steps_per_loop,
        checkpoint_every_steps=config.checkpoint_every_steps,
        step_in_epoch=self.step_in_epoch, interrupted=interrupted,
        agree=self._agree,
        save=lambda sums: self._save(totals=sums),
        desc=f"epoch {epoch + 1}/{config.epochs}",
        show_progress=self.show_progress, totals=before)
    metrics = {}
    count = totals.get("train/count", 0.0)
    if count:
      metrics["train/loss"] = totals["train/loss_sum"] / count
      metrics["train/acc"] = totals["train/correct"] / count
    try:
      metrics.update(self.evaluate(
          stopping.evaluation_interrupts(self.strategy, interrupted)))
    except KeyboardInterrupt as e:  # A stop in evaluation: keep the sums.
      self._save(totals=totals)
      e.saved = True
      raise
    metrics["train/drop_path_prob"] = drop_prob
    metrics["epoch_seconds"] = time.time() - t0
    with stopping.ctrl_c_stops(interrupted, loop.AT_EPOCH_END):
      self.epoch.assign(epoch + 1)
      self.step_in_epoch.assign(0)
      self._save()
      loop.drop_partial_epoch(self.write_dir)
      summaries.write_scalars(
          self.writer, {k: v for k, v in metrics.items()
                        if k.startswith(("train/", "val/"))},
          int(self.optimizer.iterations.numpy()))
      self.writer.flush()
      return loop.finish_epoch(self.write_dir, epoch, metrics)
