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
from tfnas.genotype import CellGenotype, Genotype


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


# ----------------------------------------------------------------------------
# Whole evaluation networks (tfnas.models): parameters and multiply-adds.
# ----------------------------------------------------------------------------

#: BatchNorm layers inside each op (2 affine parameters per channel each).
_OP_BATCH_NORMS = {"sep_conv_": 2, "dil_conv_": 1}


@dataclasses.dataclass(frozen=True)
class NetworkCost:
  """Size of an evaluation network, as the papers report it.

  Attributes:
    params: trainable parameters (conv, dense and affine BN weights), the
      auxiliary head excluded.
    madds: multiply-adds of one inference on one image (convolutions and the
      classifier; BN, ReLU, pooling and additions are not counted, as in the
      mobile-setting tables), the auxiliary head excluded.
  """
  params: int
  madds: int

  def __add__(self, other: "NetworkCost") -> "NetworkCost":
    return NetworkCost(self.params + other.params, self.madds + other.madds)


def _conv(h, w, k, c_in, c_out, groups=1) -> NetworkCost:
  weights = k * k * c_in * c_out // groups
  return NetworkCost(weights, h * w * weights)


def _bn(c) -> NetworkCost:
  return NetworkCost(2 * c, 0)


def _edge_cost(op_name: str, c: int, stride: int,
               input_hw: tuple[int, int]) -> NetworkCost:
  """Params incl. BN and multiply-adds of one derived-cell edge."""
  base = op_cost(op_name, c, stride, input_hw)
  if base.params == 0:  # none, identity, pools: no multiply-adds.
    return NetworkCost(0, 0)
  norms = 1  # FactorizedReduce (strided skip_connect).
  for prefix, n in _OP_BATCH_NORMS.items():
    if op_name.startswith(prefix):
      norms = n
  return NetworkCost(int(base.params) + norms * 2 * c, int(base.flops))


def _preprocess_cost(c_in, c, hw, factorized):
  h, w = hw
  if factorized:  # Two stride-2 1×1 convs to c/2 each, then BN.
    oh, ow = math.ceil(h / 2), math.ceil(w / 2)
    half = _conv(oh, ow, 1, c_in, c // 2)
    return half + half + _bn(c)
  return _conv(h, w, 1, c_in, c) + _bn(c)


def network_cost(genotype, kind: str, input_shape, num_classes: int,
                 num_cells: int, channels: int,
                 stem_multiplier: int = 3) -> NetworkCost:
  """Analytic parameters and multiply-adds of a ``tfnas.models`` network.

  Walks the same layout as :func:`tfnas.models.build_network` (stems,
  reduction cells at 1/3 and 2/3 depth, FactorizedReduce after a
  reduction), without building anything; tested equal to the built
  network's parameter count.

  Args:
    genotype: a :class:`tfnas.genotype.Genotype`.
    kind: ``"cifar"`` or ``"imagenet"``.
    input_shape: ``(H, W, C)`` of one image.
    num_classes, num_cells, channels: network shape.
    stem_multiplier: CIFAR stem width factor.

  Returns:
    A :class:`NetworkCost`.
  """
  h, w, c_img = input_shape
  total = NetworkCost(0, 0)
  if kind == "cifar":
    stem = stem_multiplier * channels
    total += _conv(h, w, 3, c_img, stem) + _bn(stem)
    c_pp = c_p = stem
    hw_pp = hw_p = (h, w)
    reduction_prev = False
  elif kind == "imagenet":
    half = lambda hw: (math.ceil(hw[0] / 2), math.ceil(hw[1] / 2))
    hw1 = half((h, w))
    hw2 = half(hw1)
    hw3 = half(hw2)
    total += _conv(*hw1, 3, c_img, channels // 2) + _bn(channels // 2)
    total += _conv(*hw2, 3, channels // 2, channels) + _bn(channels)
    total += _conv(*hw3, 3, channels, channels) + _bn(channels)
    c_pp = c_p = channels
    hw_pp, hw_p = hw2, hw3
    reduction_prev = True
  else:
    raise TfnasError(f"unknown network {kind!r}; known: cifar, imagenet")
  reductions = {num_cells // 3, 2 * num_cells // 3}
  c = channels
  for i in range(num_cells):
    reduction = i in reductions
    if reduction:
      c *= 2
    cell = genotype.reduce if reduction else genotype.normal
    total += _preprocess_cost(c_pp, c, hw_pp, reduction_prev)
    total += _preprocess_cost(c_p, c, hw_p, False)
    for _, op, source in cell.edges():
      stride = 2 if reduction and source < 2 else 1
      in_hw = hw_p if source < 2 else (
          (math.ceil(hw_p[0] / 2), math.ceil(hw_p[1] / 2)) if reduction
          else hw_p)
      total += _edge_cost(op, c, stride, in_hw)
    out_hw = ((math.ceil(hw_p[0] / 2), math.ceil(hw_p[1] / 2)) if reduction
              else hw_p)
    c_pp, c_p = c_p, len(cell.concat) * c
    hw_pp, hw_p = hw_p, out_hw
    reduction_prev = reduction
  total += NetworkCost(c_p * num_classes + num_classes, c_p * num_classes)
  return total


def cell_network_fixed_cost(num_cells: int, num_nodes: int, channels: int,
                            input_shape, num_classes: int,
                            stem_multiplier: int = 3) -> NetworkCost:
  """What a CIFAR-layout cell network has besides its cells' edges.

  The stem, every cell's two preprocessing convs (1×1 to the cell's width;
  FactorizedReduce after a reduction cell) and the classifier, for cells
  that concatenate all ``num_nodes`` nodes: a search supernet and each of
  its single-path children (`tfnas.spaces.darts.SearchNetwork`, whose
  layout :func:`network_cost` walks). Arguments as there.
  """
  no_edges = CellGenotype(nodes=[()] * num_nodes)
  return network_cost(Genotype(normal=no_edges, reduce=no_edges), "cifar",
                      input_shape, num_classes, num_cells, channels,
                      stem_multiplier)
