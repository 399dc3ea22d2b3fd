"""The one search loop shared by every method.

    for epoch:                                    (eager, between loops)
      for chunk of steps_per_loop steps:          (one tf.function call)
        strategy.run(estimator.step, train batch, val batch)
      evaluate, TensorBoard, checkpoint, genotype.json

An estimator whose step has several phases (``Estimator.phases``: DARTS's α
step, then its w step) gets one tf.function per phase, called in order for
every step from a Python loop. A single-path estimator
(``compiled_step = False``, DSNAS) runs the same
chunks with a Python loop instead of one tf.function: it picks the child with
Python ints every step, and the chosen ops run as shared traced functions
(see ``tfnas/estimators/dsnas.py``); once early stop leaves at most
``--compiled_children`` possible children, each child's step is traced as
one graph and kept (before that, ``--single_path_step=switch`` runs every
child through one traced graph whose edges or blocks choose their op at run
time).
The three step loops live in ``tfnas.train.step_loops``, shared with
retraining.
Progressive early stop (methods with ``early_stop``) is checked at epoch
ends or every N steps.

The method (distribution + estimator + selector) comes from
``tfnas.methods``; everything else is here, once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

from absl import logging as log
import keras
import numpy as np
import tensorflow as tf

from tfnas import data as data_lib
from tfnas import dataset_names
from tfnas import distribute
from tfnas import genotype as genotype_lib
from tfnas import methods as methods_lib
from tfnas.arch import (EVAL_SALT, ArchParams, ArgmaxDistribution,
                        argmax_indices, one_hot_weights)
from tfnas.early_stop import ProgressiveEarlyStop
from tfnas.estimators.base import METRIC_SUMS
from tfnas.config import SearchConfig
from tfnas.errors import TfnasError
from tfnas.layers.batch_norm import batch_norm_parameters
from tfnas.spaces import names as space_names
from tfnas.spaces import registry as space_registry
from tfnas.train import (loop, optim, rundir, schedules, step_loops, stopping,
                         summaries)
from tfnas.train.checkpointing import ModelVariables, restore_latest
from tfnas.train.child_cache import ChildCache
from tfnas.train.step import StepContext



def _run_phase(phase, ctx, step, train_batch, val_batch):
  return phase(ctx, train_batch, val_batch, step)


def _summed_cross_entropy(logits, labels):
  return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
      tf.cast(labels, tf.int32), logits))


@dataclasses.dataclass
class SearchResult:
  genotype: genotype_lib.Genotype
  alphas: dict
  history: list  # One dict of epoch metrics per epoch.


def _warn_about_space(space, flag_space: str, image_size: int) -> None:
  """Logs the space's warnings on these images (`space_warnings`), each
  after the --space it is about."""
  for message in space_registry.space_warnings(space, image_size):
    log.warning("--space=%s: %s", flag_space, message)


class SearchData:
  """The search-train and search-val splits (``tfnas.data.Split``)."""

  def __init__(self, config: SearchConfig, single_level: bool = False,
               replicas: int = 1):
    self.info = data_lib.dataset_info(config.dataset)
    load = dict(data_dir=config.data_dir, manual_dir=config.manual_dir)
    if single_level:
      # Single-level methods learn w and α on the whole training set; the
      # held-out test split only reports accuracy (it steers nothing).
      self.train = data_lib.open_split(config.dataset, "train", **load)
      self.val = data_lib.open_split(config.dataset, "test", **load)
    else:
      self.train, self.val = data_lib.open_search_splits(
          config.dataset, config.train_portion, **load)
    self.single_level = single_level
    self.train_portion = config.train_portion
    self.augment = data_lib.AugmentConfig.of_run(config,
                                                 self.info.image_size)
    self.batch_size = config.batch_size
    self.seed = config.seed
    # The split(s) each training step draws a batch from.
    largest = (self.train.num_examples if single_level else
               min(self.train.num_examples, self.val.num_examples))
    steps = largest // config.batch_size
    if steps < 1:
      # The global batch must also split evenly over the replicas.
      fits = largest - largest % replicas
      if not fits:
        hint = f", which hold fewer examples than the {replicas} replicas"
      elif replicas == 1:
        hint = f": use --batch_size={fits} or less"
      else:
        hint = (f": use a --batch_size that is a multiple of the "
                f"{replicas} replicas, at most {fits}")
      raise data_lib.DataError(
          f"--batch_size={config.batch_size} is larger than the search "
          f"splits ({self.train.num_examples} train / "
          f"{self.val.num_examples} val){hint}")
    if config.max_steps_per_epoch:
      steps = min(steps, config.max_steps_per_epoch)
    self.steps_per_epoch = steps

  @property
  def eval_split(self) -> str:
    """The split that ``val/`` metrics are measured on, in words."""
    return ("test" if self.single_level else
            f"train, held out ({1 - self.train_portion:g} of it)")

  def _stream(self, strategy, split, epoch, seed, skip, training):
    return split.distribute(
        strategy, batch_size=self.batch_size, training=training, epoch=epoch,
        seed=seed, augment=self.augment, skip_batches=skip,
        drop_remainder=training)

  def train_streams(self, strategy, epoch: int, skip: int):
    # Both halves are augmented like training data (they are both drawn
    # from the training set, as in the DARTS search code).
    train = self._stream(strategy, self.train, epoch, self.seed, skip, True)
    if self.single_level:
      return train, None
    return train, self._stream(strategy, self.val, epoch, self.seed + 7919,
                               skip, True)

  def eval_stream(self, strategy):
    return self._stream(strategy, self.val, 0, self.seed, 0, False)


def _comparable(config: dict) -> dict:
  """A search config as a resume compares it: a ShuffleNet shape spelt out
  or left to its preset alike, an npz data file by its content."""
  return dataset_names.by_content(space_registry.resolved_shape(config))


#: How a search's config.json and a resume's flags compare (`rundir.prepare`).
_RESUME_RULES = dict(allowed_changes=SearchConfig.RESUMABLE_CHANGES,
                     defaults=SearchConfig().to_dict(),
                     normalize=_comparable,
                     check_saved=data_lib.check_saved_dataset)


class Search:
  """A search run: builds everything under a strategy and runs the loop.

  Args:
    config: the frozen search config.
    strategy: a ``tf.distribute`` strategy (default strategy if None).
    resume: continue from the last checkpoint of ``config.run_dir``.
    show_progress: draw a progress bar per epoch and per evaluation.
    read_only: load the latest checkpoint of ``config.run_dir`` to evaluate
      it, writing nothing there (no config, checkpoint list or events); such
      a Search does not `run`.
  """

  def __init__(self, config: SearchConfig, strategy=None, resume=False,
               show_progress=True, read_only=False):
    if not read_only:
      if resume and rundir.has_run(config.run_dir):
        # Flags other than the run's are named before anything they load
        # (e.g. another --dataset) can fail.
        rundir.resumable_config(config.run_dir, config.to_dict(),
                                **_RESUME_RULES)
      else:
        config.check_method_fields()  # A new run: nothing set in vain.
    self.config = config
    self.read_only = read_only
    self.strategy = strategy or tf.distribute.get_strategy()
    self.method = methods_lib.get_method(config.method)
    self.show_progress = show_progress
    self.data = SearchData(config, single_level=self.method.single_level,
                           replicas=self.strategy.num_replicas_in_sync)
    loop.check_same_data(self.strategy, self.data.info, self.data.train,
                         self.data.val)
    self.space = space_registry.space_config(
        config, self.data.info.num_classes, self.data.info.image_size)
    kind = space_registry.space_kind(self.space)
    if kind not in self.method.space_kinds:
      raise TfnasError(f"--method={config.method} cannot search the {kind} "
                       f"space --space={config.space}; it supports "
                       f"{list(self.method.space_kinds)} spaces")
    self._check_sync_batch_norm(kind)
    info = self.data.info
    self.setup = methods_lib.SearchSetup(
        config, self.space, self.data.steps_per_epoch, info.image_size,
        info.channels)
    if self.method.check is not None and not read_only:
      self.method.check(self.setup)
    if read_only:
      self.resuming, self.write_dir = True, None
    else:
      _warn_about_space(self.space, config.space, self.data.info.image_size)
      total = self.setup.total_steps
      if (self.method.early_stop and config.early_stop_threshold > 0 and
          config.early_stop_every_steps > total):
        log.warning("--early_stop_every_steps=%d is more than this run's %d "
                    "steps: early stop never checks "
                    "(--early_stop_every_steps=0 checks at the end of every "
                    "epoch)", config.early_stop_every_steps, total)
      self.resuming, self.write_dir = loop.open_run(
          self.strategy, config.run_dir, resume, lambda: rundir.prepare(
              config.run_dir, config.to_dict(), resume, respelled=("dataset",),
              **_RESUME_RULES))
      loop.save_dataset_record(self.write_dir, self.data.info)
    self._build()

  def _check_sync_batch_norm(self, kind: str) -> None:
    """Refuses synchronized BN where its collectives cannot be ordered.

    An eager single-path step in a cell space issues each shared edge
    function's BN all-reduces from every local replica's thread; the
    threads reach them in different orders and the collectives abort
    ("Shape mismatch in the collective instance"). Block spaces, compiled
    steps and one replica per process are unaffected. Switched steps
    (``--single_path_step=switch``, any space) are refused with several
    replicas.
    """
    config = self.config
    if (config.sync_batch_norm and config.single_path_step == "switch" and
        self.strategy.num_replicas_in_sync > 1):
      # Switched edges run as functions traced once for all replicas; a
      # synchronized BN's all-reduce cannot be issued from inside them.
      raise TfnasError(
          f"--sync_batch_norm with --single_path_step=switch needs a single "
          f"replica (this run has {self.strategy.num_replicas_in_sync}): "
          f"drop --sync_batch_norm (per-replica statistics) or use "
          f"--single_path_step=eager")
    replicas = distribute.local_replicas(self.strategy)
    if (config.sync_batch_norm and self.method.eager_steps and
        kind == space_names.CELLS and replicas > 1):
      raise TfnasError(
          f"--sync_batch_norm with --method={config.method} in the cell "
          f"space --space={config.space} needs one replica per process "
          f"(this process has {replicas}): "
          f"drop --sync_batch_norm (per-replica statistics), run one "
          f"device per worker (--strategy=multi_worker), or search a block "
          f"space")

  def describe(self) -> str:
    """One line on what this search runs: method, space, supernet size,
    data and steps."""
    config, data = self.config, self.data
    if space_registry.space_kind(self.space) == space_names.CELLS:
      shape = (f"{config.num_cells} cells of {config.num_nodes} nodes, "
               f"C={config.channels}")
    else:
      shape = f"{self.space.num_blocks} choice blocks"
    params = sum(int(np.prod(v.shape)) for v in self.network.trainable_weights)
    held_out = "test" if data.single_level else "held-out"
    dataset = dataset_names.flag_name(config.dataset)
    if (self.estimator.child_steps and
        config.single_path_step != "switch"):
      # Python-driven steps (until few children are left to trace).
      traced = "the first children's steps also trace their ops"
    else:
      traced = "the first steps also trace the step graph"
    return (f"{config.method} search, {config.space} space ({shape}, "
            f"{params / 1e6:.3f}M supernet parameters); {dataset}: "
            f"{data.train.num_examples} train / {data.val.num_examples} "
            f"{held_out} images, {data.steps_per_epoch} "
            f"step{'' if data.steps_per_epoch == 1 else 's'} per epoch x "
            f"{config.epochs} epoch{'' if config.epochs == 1 else 's'} "
            f"({traced})")

  # ------------------------------------------------------------------ build
  def _build(self):
    config, info = self.config, self.data.info
    steps = self.data.steps_per_epoch
    # Weight initialisers draw from Keras' global seed: same seed, same w.
    keras.utils.set_random_seed(config.seed)
    with self.strategy.scope():
      self.network = space_registry.build_network(
          self.space, (info.image_size, info.image_size, info.channels))
      self.arch = ArchParams(self.space.decision_groups(),
                             init_scale=config.arch_init_scale,
                             seed=config.seed)
      self.w_opt = optim.SGD(
          schedules.cosine_schedule(config.w_lr, config.w_lr_min,
                                    config.epochs, steps,
                                    config.w_lr_warmup_epochs,
                                    config.w_lr_per_step),
          momentum=config.w_momentum, weight_decay=config.w_weight_decay,
          clip_norm=config.grad_clip, name="weight_sgd")
      self.w_opt.build(
          self.network.trainable_variables,
          no_decay=(batch_norm_parameters(self.network)
                    if config.exclude_bn_from_weight_decay else ()))
      self.a_opt = optim.Adam(
          config.arch_lr, beta_1=config.arch_beta1, beta_2=config.arch_beta2,
          weight_decay=config.arch_weight_decay, name="arch_adam")
      self.a_opt.build(self.arch.variables_list)
      self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
      self.step_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
      self.early_stop = None
      if self.method.early_stop and config.early_stop_threshold > 0:
        self.early_stop = ProgressiveEarlyStop(
            self.arch, config.early_stop_threshold,
            on_logits=config.early_stop_on_logits)
      setup = self.setup
      self.ctx = StepContext(self.network, self.arch,
                             self.method.distribution(setup), self.w_opt,
                             self.a_opt, config.batch_size,
                             label_smoothing=config.label_smoothing,
                             fixed_decisions=self.early_stop)
      # Estimator state (e.g. DSNAS reward statistics) is mirrored too.
      self.estimator = self.method.estimator(setup)
    extra = {}
    if self.early_stop is not None:
      extra["early_stop"] = self.early_stop
    if hasattr(self.estimator, "checkpoint_objects"):
      extra.update(self.estimator.checkpoint_objects())
    self.checkpoint = tf.train.Checkpoint(
        network=ModelVariables(self.network), arch=self.arch,
        weight_optimizer=self.w_opt, arch_optimizer=self.a_opt,
        epoch=self.epoch, step_in_epoch=self.step_in_epoch, **extra)
    if self.read_only:
      self.manager = None
      #: The checkpoint a read-only search evaluates.
      self.restored = restore_latest(
          self.checkpoint, os.path.join(config.run_dir, "ckpt"),
          forget_unreadable=False)
      if self.restored is None:
        raise TfnasError(f"{config.run_dir}/ckpt holds no checkpoint yet")
    else:
      self.manager = loop.checkpoint_manager(
          self.checkpoint, self.write_dir, self.resuming,
          restore_dir=config.run_dir)
    self._children = ChildCache(config.compiled_children, self.arch,
                                self.early_stop)
    self._switch_step = None  # Traced on first use (--single_path_step).
    self._train_loop = self._make_train_loop()
    self._eval_steps = {child: self._make_eval_step(child)
                        for child in (False, True)}
    # TensorBoard's view restarts after the restored step (see the writer).
    first_step = int(self.w_opt.iterations.numpy()) + 1
    self.writer = (tf.summary.create_noop_writer() if self.read_only else
                   summaries.LazyFileWriter(os.path.join(self.write_dir, "tb"),
                                            start_step=first_step))
    self._agree = stopping.stop_agreement(self.strategy)

  def _make_train_loop(self):
    """The step loop for this method's estimator (``tfnas.train.step_loops``):
    iterators ``(train, val)``, the val one ``None`` for single-level
    methods."""
    estimator, ctx, strategy = self.estimator, self.ctx, self.strategy
    keys = estimator.metric_keys()
    iterations = self.w_opt.iterations
    if not estimator.compiled_step:
      every = self.config.early_stop_every_steps

      def after_step():
        if (self.early_stop is not None and every and
            int(iterations.numpy()) % every == 0):
          self._check_early_stop()
      return step_loops.eager_step_loop(
          strategy, keys,
          lambda train, val, step: estimator.step(ctx, train, val, step),
          step_args=lambda: (int(iterations.numpy()),), after_step=after_step,
          compiled_for=self._compiled_child_step)
    phases = estimator.phases()
    if len(phases) > 1:
      with strategy.scope():
        estimator.build(ctx)
      return step_loops.phased_step_loop(strategy, keys, [
          functools.partial(_run_phase, phase, ctx, iterations)
          for phase in phases])
    return step_loops.compiled_step_loop(
        strategy, keys,
        lambda train, val: estimator.step(ctx, train, val, iterations))

  def _compiled_child_step(self, step: int):
    """The traced step of this step's child once few children are left
    (`ChildCache.active`); else, with ``--single_path_step=switch``, the
    one switched step given this child; else ``None``: the step runs
    eagerly."""
    estimator, ctx = self.estimator, self.ctx
    if not estimator.child_steps:
      return None
    if not self._children.active():
      if self.config.single_path_step != "switch":
        return None
      if self._switch_step is None:
        self._switch_step = step_loops.compiled_replica_step(
            self.strategy,
            lambda train, val, indices: estimator.switch_step(
                ctx, train, indices))
      child = {g: tf.constant(v, tf.int32)
               for g, v in estimator.sample(ctx, step).items()}
      return lambda batches: self._switch_step((*batches, child))
    indices = estimator.sample(ctx, step)
    return self._children.get("step", indices, lambda: (
        step_loops.compiled_replica_step(
            self.strategy,
            lambda train, val: estimator.child_step(ctx, train, indices))))

  def _check_early_stop(self):
    for group, e, k in self.early_stop.check():
      log.info("early stop: %s decision %d fixed to %s", group, e,
               self.arch.group(group).candidates[k])

  def _eval_indices(self, child: bool):
    """Single-path evaluation: the argmax child, or a child drawn from the
    current α (noise apart from the training steps')."""
    if child:
      return argmax_indices(self.arch)
    fixed = self.early_stop.fixed() if self.early_stop is not None else None
    return self.ctx.distribution.sample_indices(
        self.arch, int(self._last_step().numpy()), fixed=fixed,
        salt=EVAL_SALT)

  def _make_single_path_eval(self, child: bool):
    ctx = self.ctx
    batch_stats = self.method.eval_batch_stats
    indices = self._eval_indices(child)
    gates = one_hot_weights(self.arch, indices)
    arch_indices = {g: tuple(int(i) for i in v) for g, v in indices.items()}

    def replica(images, labels):
      if batch_stats:
        with keras.StatelessScope():
          logits = ctx.forward(images, gates, arch_indices, training=True,
                               dropout=False)
      else:
        logits = ctx.forward(images, gates, arch_indices, training=False)
      return step_loops.eval_metrics(_summed_cross_entropy(logits, labels),
                                     logits, labels)
    step = step_loops.summed_eval_step(self.strategy, replica)
    if self._children.active():
      return self._children.get(
          "eval", indices, lambda: step_loops.EvalStep(step))
    return step  # Eager.

  def _make_eval_step(self, child: bool):
    ctx = self.ctx
    batch_stats = self.method.eval_batch_stats

    def replica(images, labels):
      if child:  # The one-hot argmax child (SNAS Table 1).
        weights = ArgmaxDistribution().sample(ctx.arch)
      else:  # The search distribution at the last trained step's λ, with
        # noise apart from the training steps'.
        weights = ctx.distribution.sample(ctx.arch, self._last_step(),
                                          salt=EVAL_SALT)
      if batch_stats:
        # Batch statistics; the scope swallows moving-statistic updates.
        with keras.StatelessScope():
          logits = ctx.forward(images, weights, training=True,
                               dropout=False)
      else:
        logits = ctx.forward(images, weights, training=False)
      return step_loops.eval_metrics(_summed_cross_entropy(logits, labels),
                                     logits, labels)
    return step_loops.compiled_eval_step(self.strategy, replica)

  # --------------------------------------------------------------- helpers
  def _last_step(self):
    """Index of the last training step taken (0 before any)."""
    return tf.maximum(self.w_opt.iterations - 1, 0)

  def alphas(self) -> dict[str, np.ndarray]:
    return self.arch.numpy()

  def genotype(self) -> genotype_lib.Genotype:
    masks = {g.name: g.mask_array() for g in self.arch.groups
             if g.mask is not None}
    return self.method.selector(self.alphas(), self.arch.groups[0].candidates,
                                getattr(self.space, "num_nodes", None), masks)

  def evaluate(self, child: bool = False,
               interrupted: list | None = None) -> dict[str, float]:
    """Supernet accuracy on the validation split (BN per
    Method.eval_batch_stats).

    ``child=False`` uses the search distribution's sample (softmax α for
    DARTS, for SNAS a relaxed sample at λ of the last training step, the λ
    that ``arch/temperature`` logs); ``child=True`` the
    one-hot argmax architecture, without fine-tuning. ``interrupted``: as
    for `step_loops.evaluate`.
    """
    if getattr(self.ctx.distribution, "single_path", False):
      eval_step = self._make_single_path_eval(child)
    else:
      eval_step = self._eval_steps[child]
    return step_loops.evaluate(
        self.data.eval_stream(self.strategy), eval_step,
        prefix="val/child_" if child else "val/",
        show_progress=self.show_progress,
        batches=data_lib.steps_per_epoch(self.data.val.num_examples,
                                         self.data.batch_size,
                                         drop_remainder=False),
        interrupted=interrupted)

  def _save(self, totals=None):
    """Checkpoint (mid-epoch: with the epoch's metric sums ``totals``),
    genotype.json and arch.json; returns the genotype."""
    run_dir = self.write_dir
    loop.save_checkpoint(self.manager, run_dir, self.w_opt.iterations,
                         self.epoch, totals)
    genotype = self.genotype()
    genotype.save(os.path.join(run_dir, "genotype.json"))
    arch_record = {
        "epoch": int(self.epoch.numpy()),
        "step": int(self.w_opt.iterations.numpy()),
        "groups": {g.name: {"candidates": list(g.candidates),
                            "logits": self.arch.logits[g.name].numpy().tolist()}
                   for g in self.arch.groups}}
    if self.early_stop is not None:
      for name, fixed in self.early_stop.fixed().items():
        arch_record["groups"][name]["fixed"] = fixed.tolist()
    rundir.atomic_write(os.path.join(run_dir, "arch.json"),
                        json.dumps(arch_record, indent=1))
    return genotype

  # ------------------------------------------------------------------- run
  def run(self, stop_after_epochs: int | None = None) -> SearchResult:
    """Runs the remaining epochs (or only ``stop_after_epochs`` of them).

    Stopping early is what a preemption at an epoch boundary does: the
    checkpoint is written and a later ``Search(..., resume=True).run()``
    continues as if never stopped (same schedule, data order and α).
    """
    if self.read_only:
      raise TfnasError("a read-only Search evaluates; it does not run")
    history = loop.run_epochs(
        strategy=self.strategy, epoch=self.epoch, epochs=self.config.epochs,
        run_epoch=self._run_epoch, save=self._save,
        agree=self._agree, writer=self.writer, run_dir=self.config.run_dir,
        stop_after_epochs=stop_after_epochs)
    return SearchResult(self.genotype(), self.alphas(), history)

  def _run_epoch(self, interrupted) -> dict:
    config, steps = self.config, self.data.steps_per_epoch
    epoch = int(self.epoch.numpy())
    start = int(self.step_in_epoch.numpy())
    train_ds, val_ds = self.data.train_streams(self.strategy, epoch, start)
    train_iter = iter(train_ds)
    val_iter = iter(val_ds) if val_ds is not None else None
    t0 = time.time()
    before = loop.resumed_totals(config.run_dir,
                                 int(self.w_opt.iterations.numpy()), epoch,
                                 start)

    totals = loop.run_epoch(
        run_chunk=loop.chunk_runner(
            self._train_loop, (train_iter, val_iter), self.w_opt, self.writer),
        steps=steps, start=start,
        steps_per_loop=config.steps_per_loop,
        checkpoint_every_steps=config.checkpoint_every_steps,
        step_in_epoch=self.step_in_epoch, interrupted=interrupted,
        agree=self._agree,
        save=lambda sums: self._save(totals=sums),
        desc=f"epoch {epoch + 1}/{config.epochs}",
        show_progress=self.show_progress, totals=before)
    metrics = self._epoch_metrics(totals,
                                  steps - (start if before is None else 0))
    try:
      if self.early_stop is not None:
        if not config.early_stop_every_steps:
          self._check_early_stop()
        metrics["arch/fixed_decisions"] = float(self.early_stop.num_fixed())
      stops = stopping.evaluation_interrupts(self.strategy, interrupted)
      metrics.update(self.evaluate(interrupted=stops))
      if self.method.child_eval:
        metrics.update(self.evaluate(child=True, interrupted=stops))
    except KeyboardInterrupt as e:  # A stop in evaluation: keep the sums.
      self._save(totals=totals)
      e.saved = True
      raise
    temperature = getattr(self.ctx.distribution, "temperature", None)
    if temperature is not None:  # λ of the epoch's last step.
      metrics["arch/temperature"] = float(temperature(self._last_step()))
    metrics["epoch_seconds"] = time.time() - t0
    with stopping.ctrl_c_stops(interrupted, loop.AT_EPOCH_END):
      self.epoch.assign(epoch + 1)
      self.step_in_epoch.assign(0)
      genotype = self._save()
      loop.drop_partial_epoch(self.write_dir)
      step = int(self.w_opt.iterations.numpy())
      summaries.write_scalars(
          self.writer, {k: v for k, v in metrics.items()
                        if k.startswith(("train/", "val/", "search/",
                                         "arch/"))},
          step)
      summaries.write_arch(
          self.writer, self.arch, step, genotype,
          self.early_stop.fixed() if self.early_stop is not None else None)
      self.writer.flush()
      return loop.finish_epoch(self.write_dir, epoch, metrics)

  @staticmethod
  def _epoch_metrics(totals, num_steps):
    metrics = {}
    for key, value in totals.items():  # Per-step quantities: mean.
      if not key.endswith(METRIC_SUMS):
        metrics[key] = value / max(num_steps, 1)
    for prefix, tag in (("train", "train"), ("val", "search/val")):
      count = totals.get(f"{prefix}/count", 0.0)
      if count:
        metrics[f"{tag}_loss" if tag != "train" else "train/loss"] = (
            totals[f"{prefix}/loss_sum"] / count)
        metrics[f"{tag}_acc" if tag != "train" else "train/acc"] = (
            totals[f"{prefix}/correct"] / count)
    return metrics
