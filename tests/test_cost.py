"""Analytic per-op costs (SNAS appendix F) against hand computations."""

import pytest

from tfnas import cost
from tfnas.errors import TfnasError


def test_sep_conv_by_hand():
  # C=4, 8x8 input, stride 1: two (dw 3x3 + pw 1x1) units.
  c = cost.op_cost("sep_conv_3x3", 4, 1, (8, 8))
  unit_params = 9 * 4 + 4 * 4
  assert c.params == 2 * unit_params
  assert c.flops == 2 * 64 * unit_params
  assert c.mac == 2 * (64 * 8 + 9 * 4 + 64 * 8 + 16)


def test_reduction_edges_use_the_output_size():
  c = cost.op_cost("dil_conv_5x5", 8, 2, (8, 8))  # 4x4 output
  assert c.params == 25 * 8 + 64
  assert c.flops == 16 * (25 * 8 + 64)
  fr = cost.op_cost("skip_connect", 8, 2, (7, 7))  # FactorizedReduce, 4x4
  assert fr.params == 2 * 8 * 4
  assert fr.flops == 16 * 2 * 8 * 4


def test_parameter_free_ops_are_told_apart():
  none = cost.op_cost("none", 4, 1, (8, 8))
  skip = cost.op_cost("skip_connect", 4, 1, (8, 8))
  pool = cost.op_cost("max_pool_3x3", 4, 1, (8, 8))
  assert none == cost.OpCost()
  assert skip.params == pool.params == 0
  assert skip.flops == 0 < pool.flops == 64 * 9 * 4
  assert 0 < skip.mac == pool.mac == 64 * 8


def test_unknown_op():
  with pytest.raises(TfnasError, match="conv_9"):
    cost.op_cost("conv_9", 4, 1, (8, 8))
