"""Methods as named combinations of distribution, estimator and selector.

Adding a method means adding one entry here, never a new training script.
Factories receive a :class:`SearchSetup` (the frozen config plus what the
loop derived from it) so nothing below reads flags.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np
from absl import logging

from tfnas import block_genotype
from tfnas import derive
from tfnas import genotype as genotype_lib
from tfnas.arch import (TEMPERATURE_SCHEDULES, ArchDistribution,
                        OneHotDistribution, RelaxedOneHotDistribution,
                        SoftmaxDistribution)
from tfnas.errors import TfnasError
from tfnas.estimators.base import Estimator
from tfnas.estimators.darts import DartsFirstOrder, DartsSecondOrder


@dataclasses.dataclass(frozen=True)
class SearchSetup:
  """What method factories may use.

  Attributes:
    config: the frozen ``SearchConfig``.
    space: the space config being searched (``DartsSpaceConfig`` or
      ``ShuffleNetSpaceConfig``).
    steps_per_epoch: search steps per epoch.
    image_size: input height/width (for analytic costs).
    channels: input image channels (for analytic costs).
  """
  config: Any
  space: Any
  steps_per_epoch: int
  image_size: int
  channels: int = 3

  @property
  def total_steps(self) -> int:
    return self.config.epochs * self.steps_per_epoch


@dataclasses.dataclass(frozen=True)
class Method:
  """How a search draws samples, forms gradients and picks the child.

  Attributes:
    single_level: α and w learn from the same training batch; the search
      then trains on the whole training set and the test split is used only
      for reporting.
    child_eval: also evaluate the argmax child (one-hot α) every epoch.
    eval_batch_stats: evaluate the supernet with batch statistics in BN
      (moving statistics untouched) and no dropout. For methods that sample
      a different architecture every step, moving averages mix many
      architectures and fit none; batch statistics evaluate the
      architecture at hand.
    space_kinds: the kinds of space the method can search
      (`tfnas.spaces.names`: ``cells``, ``blocks``).
    early_stop: the method supports progressive early stop (DSNAS 3.5);
      the loop then fixes decisions per ``--early_stop_*``.
    deploys_search_weights: the argmax child keeps the weights it learned
      in the search and is deployed as is (DSNAS 2.2: the search trains
      exactly the sampled single-path children, so no retraining);
      ``tfnas-export`` exports it from the search run directory. Other
      methods' supernet weights are refused there: retrain the genotype.
    eager_steps: its estimator's step runs eagerly at the Python level
      (``compiled_step = False``: a single-path child chosen by Python ints
      every step). Cross-replica sums inside such a step are issued eagerly
      by each local replica's thread, in no fixed order across threads.
    check: refuses (`TfnasError`) a setup the method cannot search; called
      before the run directory is written, so a refused command leaves
      nothing behind.
  """
  name: str
  description: str
  distribution: Callable[[SearchSetup], ArchDistribution]
  estimator: Callable[[SearchSetup], Estimator]
  #: (alphas: group → [E, K] array, candidates, num_nodes, masks) → Genotype
  selector: Callable[..., genotype_lib.Genotype]
  single_level: bool = False
  child_eval: bool = False
  eval_batch_stats: bool = False
  space_kinds: tuple[str, ...] = ("cells",)
  early_stop: bool = False
  deploys_search_weights: bool = False
  eager_steps: bool = False
  check: Callable[[SearchSetup], None] | None = None


def magnitude_selector(alphas, candidates, num_nodes, masks=None):
  """DARTS: best non-``none`` op per edge, 2 strongest edges per node."""
  masks = masks or {}
  return derive.derive_darts(
      alphas["normal"], alphas["reduce"], candidates, num_nodes=num_nodes,
      candidate_mask=masks.get("normal"), reduce_mask=masks.get("reduce"))


def argmax_selector(alphas, candidates, num_nodes, masks=None):
  """SNAS/DSNAS: argmax per edge including ``none`` (dropped edges), no
  pruning; in a block space, the argmax choice of every block."""
  masks = masks or {}
  if set(alphas) == {"blocks"}:
    return block_genotype.derive_blocks(alphas["blocks"], candidates,
                                        masks.get("blocks"))
  return derive.derive_argmax(
      alphas["normal"], alphas["reduce"], candidates, num_nodes=num_nodes,
      candidate_mask=masks.get("normal"), reduce_mask=masks.get("reduce"))


def _relaxed_distribution(setup: SearchSetup) -> RelaxedOneHotDistribution:
  c = setup.config
  if c.temperature_schedule not in TEMPERATURE_SCHEDULES:
    raise TfnasError(f"unknown --temperature_schedule="
                     f"{c.temperature_schedule!r}; choose from "
                     f"{sorted(TEMPERATURE_SCHEDULES)}")
  if c.temperature_end > c.temperature_start:
    logging.warning("--temperature_end=%g is above --temperature_start=%g: "
                    "the relaxation's temperature rises during the search "
                    "(SNAS anneals it down, towards one-hot samples)",
                    c.temperature_end, c.temperature_start)
  schedule = TEMPERATURE_SCHEDULES[c.temperature_schedule](
      c.temperature_start, c.temperature_end, setup.total_steps)
  cells = setup.space.cell_types()
  return RelaxedOneHotDistribution(
      schedule, seed=c.seed, per_cell=c.resample_per_cell,
      cells_per_group={t: cells.count(t) for t in set(cells)})


def _snas_estimator(setup: SearchSetup):
  from tfnas import objectives  # Imports the cost tables only when needed.
  from tfnas.estimators.snas import SnasEstimator
  c = setup.config
  resource = None
  if c.resource_weight:
    tables = objectives.edge_cost_tables(setup.space, setup.image_size)
    resource = objectives.ResourceConstraint(
        objectives.combine_metric(tables, c.resource_metric),
        c.resource_weight, c.resource_gradient)
  return SnasEstimator(resource)


def _rounded(x: float, up: bool, digits: int = 4) -> float:
  """``x`` to ``digits`` significant digits, rounded up (never below ``x``)
  or down (never above): a printed bound that stays a bound, so a lower one
  can be passed back as is."""
  if not math.isfinite(x) or x <= 0:
    return x
  scale = 10.0 ** (digits - 1 - math.floor(math.log10(x)))
  k = math.ceil(x * scale) if up else math.floor(x * scale)
  while (k / scale < x) if up else (k / scale > x):  # Float round-off.
    k += 1 if up else -1
  return k / scale


def _check_dsnas(setup: SearchSetup) -> None:
  """Refuses a --flops_target below the space's cheapest child; warns about
  one that even its costliest child meets."""
  from tfnas import objectives  # Cost tables only when needed.
  c = setup.config
  if not (c.flops_weight and c.flops_target):
    return
  flops = objectives.decision_flops(setup.space, setup.image_size,
                                    setup.channels)
  masks = {g.name: g.mask_array() for g in setup.space.decision_groups()
           if g.mask is not None}
  low, high = (flops.extreme_child(cheapest, masks) / 1e6
               for cheapest in (True, False))
  if c.flops_target < low:
    raise TfnasError(
        f"--flops_target={c.flops_target:g} (M FLOPs) is below the "
        f"cheapest child of this space ({_rounded(low, up=True):g}M at "
        f"{setup.image_size}x{setup.image_size}): no child meets it")
  if c.flops_target >= high:
    logging.warning("--flops_target=%g M: even the costliest child "
                    "(%gM) meets it; the FLOPs penalty never acts",
                    c.flops_target, _rounded(high, up=False))


def _dsnas_estimator(setup: SearchSetup):
  from tfnas import objectives  # Cost tables only when needed.
  from tfnas.estimators.dsnas import DsnasEstimator, RewardNormalizer
  c = setup.config
  groups = {g.name: g.num_decisions for g in setup.space.decision_groups()}
  tables = target = None
  if c.flops_weight:
    flops = objectives.decision_flops(setup.space, setup.image_size,
                                      setup.channels)
    tables = flops.normalised_tables()
    for g in setup.space.decision_groups():  # A group no cell uses: free.
      tables.setdefault(g.name, np.zeros(
          (g.num_decisions, len(g.candidates)), np.float32))
    if c.flops_target:  # Within the space's range (`_check_dsnas`).
      target = flops.normalise(c.flops_target * 1e6)
  normalizer = RewardNormalizer(groups) if c.reward_normalization else None
  return DsnasEstimator(normalizer, tables, c.flops_weight, target,
                       update_unsampled=c.update_unsampled)


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
  if method.name in METHODS:
    raise ValueError(f"method {method.name!r} is already registered")
  METHODS[method.name] = method
  return method


register_method(Method(
    "darts_1st", "DARTS, first-order α gradient on the validation batch",
    lambda setup: SoftmaxDistribution(), lambda setup: DartsFirstOrder(),
    magnitude_selector))
register_method(Method(
    "darts_2nd", "DARTS, unrolled second-order α gradient (finite-difference "
    "Hessian-vector product)",
    lambda setup: SoftmaxDistribution(), lambda setup: DartsSecondOrder(),
    magnitude_selector))
register_method(Method(
    "snas", "SNAS, single-level Gumbel-softmax search with an optional "
    "locally decomposable resource constraint",
    _relaxed_distribution, _snas_estimator, argmax_selector,
    single_level=True, child_eval=True, eval_batch_stats=True))


register_method(Method(
    "dsnas", "DSNAS, discrete one-hot sampling with the dummy-1 gate search "
    "gradient, single path, progressive early stop",
    lambda setup: OneHotDistribution(seed=setup.config.seed),
    _dsnas_estimator, argmax_selector, single_level=True, child_eval=True,
    eval_batch_stats=True, space_kinds=("cells", "blocks"), early_stop=True,
    deploys_search_weights=True, eager_steps=True, check=_check_dsnas))


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise TfnasError(f"unknown method {name!r}; known methods: "
                     f"{sorted(METHODS)}")
  return METHODS[name]
