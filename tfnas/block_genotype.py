"""The derived architecture of a block (single-path) space, as data.

A ShuffleNetV2 single-path child is one candidate name per choice block,
e.g. ``("choice_3", "choice_x", ...)``. Stored as JSON::

    {"version": 1, "kind": "blocks", "blocks": ["choice_3", ...]}
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from tfnas.genotype import GenotypeError
from tfnas.train.rundir import atomic_write

FORMAT_VERSION = 1
KIND = "blocks"


@dataclasses.dataclass(frozen=True)
class BlockGenotype:
  """One candidate per block (DSNAS section 4.2's single-path child).

  Attributes:
    blocks: candidate name of every block, in network order.
    version: file format version.
  """
  blocks: tuple[str, ...]
  version: int = FORMAT_VERSION

  def __post_init__(self):
    object.__setattr__(self, "blocks", tuple(self.blocks))
    self.validate()

  def validate(self, choices: Sequence[str] | None = None) -> None:
    """Checks version, non-empty names and (optionally) known choices."""
    if self.version != FORMAT_VERSION:
      raise GenotypeError(f"unsupported block genotype version "
                          f"{self.version!r}; supported: {FORMAT_VERSION}")
    if not self.blocks or not all(isinstance(b, str) and b
                                  for b in self.blocks):
      raise GenotypeError(f"blocks must be a non-empty list of candidate "
                          f"names, got {list(self.blocks)}")
    if choices is not None:
      bad = [(i, b) for i, b in enumerate(self.blocks) if b not in choices]
      if bad:
        raise GenotypeError(f"block {bad[0][0]} chooses {bad[0][1]!r}, not "
                            f"one of {tuple(choices)}")

  def indices(self, choices: Sequence[str]) -> tuple[int, ...]:
    """Index of every block's choice in ``choices``."""
    self.validate(choices)
    return tuple(list(choices).index(b) for b in self.blocks)

  def ops(self) -> set[str]:
    return set(self.blocks)

  def __str__(self) -> str:
    lines = [f"BlockGenotype (version {self.version}, "
             f"{len(self.blocks)} blocks)"]
    lines += [f"  block {i:2d}: {b}" for i, b in enumerate(self.blocks)]
    return "\n".join(lines)

  def to_dict(self) -> dict[str, Any]:
    return {"version": self.version, "kind": KIND, "blocks": list(self.blocks)}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], source: str = "genotype"
                ) -> "BlockGenotype":
    if not isinstance(d, Mapping) or d.get("kind") != KIND:
      raise GenotypeError(f"{source}: expected a JSON object with "
                          f"\"kind\": \"{KIND}\", got {str(d)[:80]}")
    extra = sorted(set(d) - {"version", "kind", "blocks"})
    if extra:
      raise GenotypeError(f"{source}: unknown keys {extra}")
    try:
      return cls(tuple(d.get("blocks") or ()), d.get("version"))
    except GenotypeError as e:
      raise GenotypeError(f"{source}: {e}") from None

  def to_json(self, indent: int | None = 2) -> str:
    return json.dumps(self.to_dict(), indent=indent)

  @classmethod
  def from_json(cls, s: str | bytes, source: str = "genotype"
                ) -> "BlockGenotype":
    try:
      d = json.loads(s)
    except (ValueError, RecursionError) as e:
      raise GenotypeError(f"{source}: not valid JSON ({e})") from None
    return cls.from_dict(d, source)

  def save(self, path: str | os.PathLike) -> None:
    """Writes the JSON atomically (temporary file + rename)."""
    atomic_write(os.fspath(path), self.to_json() + "\n")

  @classmethod
  def load(cls, path: str | os.PathLike) -> "BlockGenotype":
    path = os.fspath(path)
    try:
      with open(path, "rb") as f:
        return cls.from_json(f.read(), source=path)
    except FileNotFoundError:
      raise GenotypeError(f"{path}: genotype file not found") from None


def derive_blocks(alpha: np.ndarray, choices: Sequence[str],
                  mask: np.ndarray | None = None) -> BlockGenotype:
  """The argmax choice of every block from ``[num_blocks, K]`` α."""
  alpha = np.asarray(alpha, float)
  if alpha.ndim != 2 or alpha.shape[1] != len(choices):
    raise GenotypeError(f"α of a block space must be [num_blocks, "
                        f"{len(choices)}], got shape {alpha.shape}")
  if mask is not None:
    alpha = np.where(mask, alpha, -np.inf)
  return BlockGenotype(tuple(choices[int(k)] for k in alpha.argmax(axis=1)))
