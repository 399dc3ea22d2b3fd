"""The derived child network with inherited supernet weights (DSNAS: no
retraining, section 2.2 / 4.2).

`build_child` turns a supernet and one architecture (a candidate index per
decision) into a Keras model that holds ONLY the chosen ops / choice blocks,
with their weights (and BN statistics) copied from the supernet; its
predictions equal the supernet's run with that architecture fixed.
`recalibrate_batch_norm` optionally re-estimates the BN statistics of the
child on a few training batches (the supernet's moving averages mix every
sampled child). `child_cost` reports its parameters and FLOPs. An export
app calls `load_search_child` on a finished run directory.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tfnas import export
from tfnas.errors import TfnasError
from tfnas.layers.batch_norm import batch_norm_layers
from tfnas.spaces import darts as darts_space
from tfnas.spaces import names
from tfnas.spaces import registry
from tfnas.spaces import shufflenet
from tfnas.train import rundir
from tfnas.train.checkpointing import (ModelVariables, resolve_checkpoint,
                                       restore_problem)


@keras.saving.register_keras_serializable(package="tfnas")
class FixedChild(keras.Model):
  """A network with its architecture fixed: ``call(images, training)``.

  Wraps a supernet-class network that holds only the chosen ops and calls
  it single path with the fixed indices (no gates).

  Input ``[B, H, W, C]`` images; output ``[B, num_classes]`` logits.

  Args:
    network: the child's network (``ShuffleNetSupernet`` with
      ``block_choices`` or ``SearchNetwork`` with one op per edge), built.
    arch_indices: group → per-decision Python ints passed to it.
  """

  def __init__(self, network, arch_indices: Mapping[str, Sequence[int]],
               **kwargs):
    super().__init__(**kwargs)
    self.network = network
    self.arch_indices = {g: tuple(int(i) for i in v)
                         for g, v in arch_indices.items()}

  def build(self, input_shape):
    self.built = True

  def call(self, images, training=None):
    return self.network(images, arch_indices=self.arch_indices,
                        training=training)


def _child_network(supernet, indices: Mapping[str, Sequence[int]]):
  """An unbuilt network of the supernet's class holding only chosen ops,
  and the indices to call it with. Same name as the supernet, so variable
  paths match."""
  space = supernet.space
  kind = registry.space_kind(space)
  if kind == names.BLOCKS:
    choices = [space.choices[int(k)] for k in indices[shufflenet.GROUP]]
    inline = dataclasses.replace(space, shared_functions=False)
    net = shufflenet.ShuffleNetSupernet(inline, block_choices=choices,
                                        name=supernet.name)
    return net, {shufflenet.GROUP: (0,) * space.num_blocks}
  edge_ops = {}
  for cell_type in darts_space.CELL_TYPES:
    if cell_type in space.cell_types():
      edge_ops[cell_type] = tuple((space.candidates[int(k)],)
                                  for k in indices[cell_type])
  # Inline ops (no shared functions, no recompute): a plain graph that a
  # SavedModel serves as is.
  inline = dataclasses.replace(space, edge_ops=edge_ops, recompute=False,
                               shared_functions=False)
  net = darts_space.SearchNetwork(inline, name=supernet.name)
  return net, {t: tuple(int(k) for k in indices[t]) for t in edge_ops}


def inherit_weights(child, supernet) -> int:
  """Copies every float variable of ``child`` (weights, BN statistics) from
  the supernet variable with the same path; returns how many were copied.

  Raises:
    TfnasError: if a child variable has no counterpart of the same shape.
  """
  source = {v.path: v for v in supernet.variables}
  copied = 0
  for v in child.variables:
    if not tf.as_dtype(v.dtype).is_floating:
      continue  # Random-generator state (dropout seeds), not a weight.
    s = source.get(v.path)
    if s is None or tuple(s.shape) != tuple(v.shape):
      raise TfnasError(f"child variable {v.path} {tuple(v.shape)} has no "
                       f"counterpart in the supernet")
    v.assign(s)
    copied += 1
  return copied


def build_child(supernet, indices: Mapping[str, Sequence[int]],
                input_shape: Sequence[int], name: str = "child"
                ) -> FixedChild:
  """The derived child with the supernet's weights (no retraining).

  Args:
    supernet: a built ``ShuffleNetSupernet`` or ``SearchNetwork``.
    indices: group → per-decision candidate index (e.g. argmax α, or the
      decisions fixed by early stop).
    input_shape: ``(H, W, C)``.
    name: model name.

  Returns:
    A built `FixedChild` whose predictions equal the supernet's run with
    ``arch_indices=indices`` (and gates of 1).
  """
  net, child_indices = _child_network(supernet, indices)
  # Built by a direct call, so variable paths are the supernet's paths.
  net(tf.zeros([1, *input_shape]), arch_indices=child_indices, training=False)
  inherit_weights(net, supernet)
  child = FixedChild(net, child_indices, name=name)
  child(tf.zeros([1, *input_shape]), training=False)
  return child


def recalibrate_batch_norm(model, batches: Iterable) -> int:
  """Re-estimates every BN's moving statistics as the plain average of the
  batch statistics over ``batches`` (images, or (images, labels) pairs).

  Returns:
    The number of batches used (0 leaves the statistics untouched).
  """
  bns = batch_norm_layers(model)
  momenta = [bn.momentum for bn in bns]
  count = 0
  try:
    for batch in batches:
      images = batch[0] if isinstance(batch, (tuple, list)) else batch
      for bn in bns:
        # moving = (1 - m) moving + m batch with m = 1/(n+1): running mean.
        bn.momentum = 1.0 / (count + 1)
      model(images, training=True)
      count += 1
  finally:
    for bn, m in zip(bns, momenta):
      bn.momentum = m
  return count


def child_cost(supernet, indices: Mapping[str, Sequence[int]],
               image_size: int, child=None) -> dict[str, float]:
  """Parameters and FLOPs (multiply-adds per image) of the child.

  ``params`` counts the child's trainable weights exactly (``child`` built
  from ``indices``, or built here). ``flops`` and ``madds`` are analytic
  (`tfnas.objectives.DecisionFlops`) and count the whole network;
  ``flops`` also counts a pooling edge as H·W·9·C (SNAS appendix F, the
  count ``--flops_target`` and the FLOPs penalty use), ``madds`` only the
  convolutions and the classifier, as `tfnas.cost.network_cost` counts a
  retrained network (block spaces: the same number).
  """
  from tfnas import objectives  # Cost tables only when needed.
  space = supernet.space
  if child is None:
    child = build_child(supernet, indices, (image_size, image_size,
                                            supernet.variables[0].shape[2]))
  params = sum(int(np.prod(v.shape)) for v in child.trainable_variables)
  in_channels = int(supernet.variables[0].shape[2])
  flops, madds = (objectives.decision_flops(space, image_size, in_channels,
                                            count_pooling).child(indices)
                  for count_pooling in (True, False))
  return {"params": float(params), "flops": float(flops),
          "madds": float(madds)}


def load_search_child(run_dir: str, recalibrate_batches: int = 0,
                      data_dir: str | None = None,
                      checkpoint: str | None = None,
                      allow_random_ops: bool = True,
                      dataset: str | None = None):
  """The child of a finished (or checkpointed) search run.

  Rebuilds the supernet and α from ``run_dir/config.json`` and its latest
  checkpoint (or ``checkpoint``), takes the argmax architecture (decisions
  fixed by progressive early stop keep their frozen α rows, so argmax is the
  fixed choice), and builds the child with inherited weights; optionally
  recalibrates its BN statistics on the first ``recalibrate_batches``
  training batches.

  Args:
    run_dir: the search run directory (config.json, ckpt/).
    recalibrate_batches: training batches to re-estimate BN statistics on
      (0: keep the supernet's moving averages).
    data_dir: tfds data directory for those batches (default: the run's).
    checkpoint: a checkpoint prefix of this run (``<run_dir>/ckpt/ckpt-N``);
      default: the latest.
    allow_random_ops: False: refuse a child using an op that is random at
      inference (`tfnas.export.check_random_ops`), before building it.
    dataset: the run's dataset under another name (its npz file moved:
      the same content at another path); default: config.json's.

  Returns:
    ``(child, genotype, info)``: the `FixedChild`, the run's genotype
    (``Genotype`` or ``BlockGenotype``) and a dict with ``params``,
    ``flops``, ``madds`` (`child_cost`), ``flops_scope`` (what ``flops``
    counts), ``image_size``, ``channels`` (of the input images),
    ``num_classes``, ``dataset``,
    ``method``, ``space``, ``recalibrated_batches`` (batches actually used)
    and ``checkpoint`` (the path restored).

  Raises:
    TfnasError: no checkpoint, a missing ``checkpoint``, one that does not
      hold the supernet described by config.json, or a random op not
      allowed.
  """
  from tfnas import data as data_lib
  from tfnas import methods
  from tfnas.arch import ArchParams, argmax_indices
  from tfnas.config import SearchConfig
  if recalibrate_batches < 0:
    raise TfnasError(f"recalibrate_batches={recalibrate_batches} must be >= "
                     f"0 (0: keep the supernet's BN statistics)")
  config = SearchConfig.from_dict(rundir.read_config(run_dir))
  if dataset:
    config = config.replace(dataset=dataset)
  info = data_lib.run_dataset_info(run_dir, config.dataset)
  space = registry.space_config(config, info.num_classes, info.image_size)
  input_shape = (info.image_size, info.image_size, info.channels)
  checkpoint = resolve_checkpoint(run_dir, checkpoint, "run the search first")
  supernet = registry.build_network(space, input_shape)
  arch = ArchParams(space.decision_groups(), init_scale=0.0)
  problem = restore_problem(checkpoint, network=ModelVariables(supernet),
                            arch=arch)
  if problem:
    raise TfnasError(f"checkpoint {checkpoint} does not hold the supernet "
                     f"and α described by {run_dir}/config.json ({problem})")
  indices = argmax_indices(arch)
  masks = {g.name: g.mask_array() for g in arch.groups if g.mask is not None}
  genotype = methods.get_method(config.method).selector(
      arch.numpy(), arch.groups[0].candidates,
      getattr(space, "num_nodes", None), masks)
  if not allow_random_ops:
    export.check_random_ops(genotype)
  child = build_child(supernet, indices, input_shape)
  recalibrated = 0
  if recalibrate_batches:
    # Evaluation preprocessing (no augmentation), in the data's own order.
    split = data_lib.open_split(config.dataset, "train",
                                data_dir=data_dir or config.data_dir,
                                manual_dir=config.manual_dir)
    ds = split.dataset(batch_size=config.batch_size, training=False,
                       epoch=0, seed=config.seed)
    recalibrated = recalibrate_batch_norm(child, ds.take(recalibrate_batches))
    if recalibrated < recalibrate_batches:
      logging.warning("recalibrate_batches=%d: the training split holds %d "
                      "batches of %d images; BN statistics were re-estimated "
                      "on all %d", recalibrate_batches, recalibrated,
                      config.batch_size, recalibrated)
  cost = child_cost(supernet, indices, info.image_size, child)
  scope = "whole network, multiply-adds per image"
  if registry.space_kind(space) == names.CELLS:
    scope += "; pooling edges count H·W·9·C as in SNAS appendix F"
  return child, genotype, dict(cost, flops_scope=scope,
                               image_size=info.image_size,
                               channels=info.channels,
                               num_classes=info.num_classes,
                               dataset=config.dataset, method=config.method,
                               space=config.space,
                               recalibrated_batches=recalibrated,
                               checkpoint=checkpoint)


def evaluate_search_child(child, run_dir: str, data_dir: str | None = None,
                          show_progress: bool = False,
                          dataset: str | None = None) -> dict:
  """Loss and accuracy of a deployed child on its search's evaluation split.

  The child runs as it is deployed (``training=False``: its moving or
  recalibrated BN statistics), on the split where the search reported its
  ``val/`` metrics (the test split for single-level methods such as DSNAS;
  the held-out part of the training split otherwise). The search itself
  reports ``val/child_acc`` with batch statistics, which can differ much
  from the deployed network's accuracy.

  Returns:
    ``{"val/loss", "val/acc", "split", "examples"}``.
  """
  from tfnas import data as data_lib
  from tfnas import methods
  from tfnas.config import SearchConfig
  from tfnas.train import step_loops
  from tfnas.train.search import SearchData
  config = SearchConfig.from_dict(rundir.read_config(run_dir))
  if data_dir:
    config = config.replace(data_dir=data_dir)
  if dataset:  # As in `load_search_child`.
    config = config.replace(dataset=dataset)
  single_level = methods.get_method(config.method).single_level
  splits = SearchData(config, single_level=single_level)
  strategy = tf.distribute.get_strategy()
  metrics = step_loops.evaluate(
      splits.eval_stream(strategy),
      step_loops.model_eval_step(strategy, child),
      show_progress=show_progress,
      batches=data_lib.steps_per_epoch(splits.val.num_examples,
                                       config.batch_size,
                                       drop_remainder=False))
  return dict(metrics, split=splits.eval_split,
              examples=splits.val.num_examples)
