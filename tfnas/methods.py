"""Methods as named combinations of distribution, estimator and selector.

Adding a method means adding one entry here, never a new training script.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from tfnas import genotype as genotype_lib
from tfnas.arch import ArchDistribution, SoftmaxDistribution
from tfnas.estimators.base import Estimator
from tfnas.estimators.darts import DartsFirstOrder, DartsSecondOrder


@dataclasses.dataclass(frozen=True)
class Method:
  """How a search draws samples, forms gradients and picks the child."""
  name: str
  description: str
  distribution: Callable[[], ArchDistribution]
  estimator: Callable[[], Estimator]
  #: (alphas: dict group → [E, K] array, candidates, num_nodes, masks) → Genotype
  selector: Callable[..., genotype_lib.Genotype]


def _magnitude_selector(alphas, candidates, num_nodes, masks=None):
  masks = masks or {}
  return genotype_lib.derive_darts(
      alphas["normal"], alphas["reduce"], candidates, num_nodes=num_nodes,
      candidate_mask=masks.get("normal"), reduce_mask=masks.get("reduce"))


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
  if method.name in METHODS:
    raise ValueError(f"method {method.name!r} is already registered")
  METHODS[method.name] = method
  return method


register_method(Method(
    "darts_1st", "DARTS, first-order α gradient on the validation batch",
    SoftmaxDistribution, DartsFirstOrder, _magnitude_selector))
register_method(Method(
    "darts_2nd", "DARTS, unrolled second-order α gradient (finite-difference "
    "Hessian-vector product)",
    SoftmaxDistribution, DartsSecondOrder, _magnitude_selector))


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; known methods: "
                     f"{sorted(METHODS)}")
  return METHODS[name]
