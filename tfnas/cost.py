"""Analytic cost of candidate ops: parameters, FLOPs and memory access cost.

SNAS appendix F, for a convolution with output ``H×W``, filter ``f×k``,
``I`` input and ``O`` output channels and ``g`` groups:

    params = f·k·I·O / g                      (35)
    FLOPs  = H·W·f·k·I·O / g                  (36)
    MAC    = H·W·(I + O) + f·k·I·O / g        (37)

Pooling has no parameters and ``MAC = H·W·(I + O)`` (40); its FLOPs are
counted as eq. (36) with one group per channel (``g = I``: each output
channel reads only its own input channel), i.e. ``H·W·f·k·C``. A skip
connection costs no FLOPs (39) and ``H·W·(I + O)`` memory access; ``none``
costs nothing — the three criteria together tell conv, pool, skip and none
apart. BN and ReLU are not counted (the appendix counts convolutions).
"""

from __future__ import annotations

import dataclasses
import math

from tfnas.errors import TfnasError


@dataclasses.dataclass(frozen=True)
class OpCost:
  params: float = 0.0
  flops: float = 0.0
  mac: float = 0.0

  def __add__(self, other: "OpCost") -> "OpCost":
    return OpCost(self.params + other.params, self.flops + other.flops,
                  self.mac + other.mac)


def conv_cost(h: int, w: int, f: int, k: int, c_in: int, c_out: int,
              groups: int = 1) -> OpCost:
  """Eqs. (35)-(37) for one convolution with output ``h×w``."""
  weights = f * k * c_in * c_out / groups
  return OpCost(weights, h * w * weights, h * w * (c_in + c_out) + weights)


def _sep_conv(h, w, k, c):
  # ReLU-dw-pw-BN twice; the first depthwise carries the stride.
  unit = conv_cost(h, w, k, k, c, c, groups=c) + conv_cost(h, w, 1, 1, c, c)
  return unit + unit


def _dil_conv(h, w, k, c):
  return conv_cost(h, w, k, k, c, c, groups=c) + conv_cost(h, w, 1, 1, c, c)


def _factorized_reduce(h, w, c):
  half = conv_cost(h, w, 1, 1, c, c // 2)
  return half + half


def op_cost(op_name: str, channels: int, stride: int,
            input_hw: tuple[int, int]) -> OpCost:
  """Cost of one candidate op of the DARTS space on one edge.

  Args:
    op_name: registered op name (``sep_conv_3x3``, ``none``, ...).
    channels: C (input = output channels on an edge).
    stride: 1, or 2 on the input edges of a reduction cell.
    input_hw: spatial size of the edge's input.
  """
  h, w = (math.ceil(d / stride) for d in input_hw)  # Output size.
  c = channels
  if op_name == "none":
    return OpCost()
  if op_name == "skip_connect":
    if stride == 1:
      return OpCost(0.0, 0.0, h * w * 2 * c)
    return _factorized_reduce(h, w, c)
  if op_name in ("max_pool_3x3", "avg_pool_3x3"):
    return OpCost(0.0, h * w * 9 * c, h * w * 2 * c)
  if op_name == "noise":  # Writes fresh noise: output access only.
    return OpCost(0.0, 0.0, h * w * c)
  for prefix, fn in (("sep_conv_", _sep_conv), ("dil_conv_", _dil_conv)):
    if op_name.startswith(prefix):
      k = int(op_name[len(prefix):].split("x")[0])
      return fn(h, w, k, c)
  raise TfnasError(f"no cost model for op {op_name!r}")
