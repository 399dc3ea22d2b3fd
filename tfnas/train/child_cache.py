"""Traced functions of single-path children, once few children remain.

A single-path step (DSNAS) runs eagerly, one shared traced function per op,
because the child changes every step and tracing a child costs about as much
as ten eager steps. Once progressive early stop leaves at most ``limit``
possible children, the same few children keep being drawn and a graph per
child pays for itself: `ChildCache` says when that point is reached and
keeps the traced step and evaluation of the ``limit`` most recently used
children.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from absl import logging as log
import numpy as np

from tfnas.arch import ArchParams
from tfnas.early_stop import ProgressiveEarlyStop, remaining_children

T = TypeVar("T")


class ChildCache:
  """Per-child traced functions, least recently used dropped first.

  Args:
    limit: trace children once at most this many remain possible (0: never;
      1: once every decision is fixed); also how many are kept per kind.
    arch: the architecture parameters (their masks bound the children).
    early_stop: the search's early stop (its fixed decisions), or None.
  """

  def __init__(self, limit: int, arch: ArchParams,
               early_stop: ProgressiveEarlyStop | None):
    self.limit = limit
    self._arch = arch
    self._early_stop = early_stop
    self._caches: dict[str, dict] = {}

  def active(self) -> bool:
    """Whether at most ``limit`` children remain possible."""
    if not self.limit:
      return False
    fixed = self._early_stop.fixed() if self._early_stop is not None else None
    return remaining_children(self._arch, fixed) <= self.limit

  def get(self, kind: str, indices: dict[str, np.ndarray],
          make: Callable[[], T]) -> T:
    """The ``kind`` function (e.g. "step", "eval") of the child ``indices``
    (group → per-decision candidate), made by ``make()`` on first use."""
    cache = self._caches.setdefault(kind, {})
    key = tuple((g, tuple(int(i) for i in v))
                for g, v in sorted(indices.items()))
    value = cache.pop(key, None)
    if value is None:
      while len(cache) >= max(self.limit, 1):
        cache.pop(next(iter(cache)))  # Least recently used first.
      log.info("tracing the %s of child %s", kind, key)
      value = make()
    cache[key] = value  # Most recently used last.
    return value

  def cached(self, kind: str) -> dict:
    """The ``kind`` functions kept, by child key, least recently used
    first (a copy)."""
    return dict(self._caches.get(kind, {}))
