"""Weight initialisers: the released code's conventions, by closed form."""

import math

import keras
import numpy as np
import pytest

from tests import helpers
from tfnas import genotypes, models
from tfnas.layers import initializers
from tfnas.spaces import darts as darts_space
from tfnas.spaces import shufflenet


@pytest.mark.parametrize("shape, depthwise, fan_in", [
    ((3, 3, 16, 2048), False, 144),  # Conv2d(16, 2048, 3)
    ((1, 1, 48, 4096), False, 48),   # 1×1 convs from 48 channels
    ((5, 5, 4096, 1), True, 25),     # Conv2d(4096, 4096, 5, groups=4096)
    ((64, 4096), False, 64),         # Linear(64, 4096)
])
def test_torch_default_is_uniform_within_one_over_root_fan_in(
    shape, depthwise, fan_in):
  keras.utils.set_random_seed(0)
  # (An unseeded Keras initialiser repeats its values call after call: one
  # large draw, with the fan-in of the layer named.)
  draws = np.ravel(initializers.FanInUniform(depthwise=depthwise)(shape))
  bound = 1 / math.sqrt(fan_in)
  assert np.abs(draws).max() <= bound
  assert np.abs(draws).max() > 0.99 * bound
  # U(-b, b) has standard deviation b/sqrt(3); the mean is 0 within five
  # standard errors.
  sigma = bound / math.sqrt(3)
  assert draws.std() == pytest.approx(sigma, rel=0.03)
  assert abs(draws.mean()) < 5 * sigma / math.sqrt(draws.size)


@pytest.mark.parametrize("shape, depthwise, stddev", [
    ((1, 1, 32, 4096), False, 1 / 32),  # pointwise: N(0, 1/in channels)
    ((3, 3, 4096, 1), True, 1.0),       # depthwise: one channel per group
])
def test_spos_kernels_are_normal_with_one_over_in_channels(shape, depthwise,
                                                          stddev):
  keras.utils.set_random_seed(0)
  init = initializers.conv_kernel("spos", depthwise=depthwise)
  draws = np.ravel(init(shape))
  assert draws.std() == pytest.approx(stddev, rel=0.03)
  assert abs(draws.mean()) < 5 * stddev / math.sqrt(draws.size)


def test_unknown_convention_is_refused():
  with pytest.raises(ValueError, match="unknown initialiser convention"):
    initializers.conv_kernel("glorot")


def _kernels(net):
  """(kernel, depthwise) of every convolution and dense layer of ``net``."""
  for layer in net._flatten_layers():  # pylint: disable=protected-access
    if isinstance(layer, keras.layers.DepthwiseConv2D):
      yield layer.kernel, True
    elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
      yield layer.kernel, False


def test_darts_search_and_derived_networks_start_as_pytorch_would():
  keras.utils.set_random_seed(0)
  space = helpers.tiny_space(candidates=darts_space.SPACE_CANDIDATES[
      "darts"], channels=8)
  search = darts_space.build_search_network(space, (8, 8, 3))
  derived = models.build_network("cifar", genotypes.resolve("DARTS_V2"),
                                 (8, 8, 3), num_classes=3, num_cells=3,
                                 channels=8, auxiliary=True)
  for net in (search, derived):
    kernels = list(_kernels(net))
    assert len(kernels) > 20
    assert sum(depthwise for _, depthwise in kernels) > 5
    for w, depthwise in kernels:
      value = np.asarray(w.numpy())
      # fan_in: area × input channels per group (a depthwise kernel: one).
      bound = 1 / math.sqrt(math.prod(value.shape[:-2]) *
                            (1 if depthwise else value.shape[-2]))
      assert np.abs(value).max() <= bound, w.path
      # Reaching the bound: not Glorot's, whose limit is lower for these
      # kernels (a depthwise 3×3 of 8 channels: 0.27 against 1/3).
      reach = 0.9 if value.size >= 50 else 0.5
      assert np.abs(value).max() > reach * bound, w.path
    biases = [w for w in net.trainable_weights if w.path.endswith("bias")]
    assert biases  # The classifiers' (and only theirs).
    for w in biases:
      assert "classifier" in w.path
      value = np.asarray(w.numpy())
      assert np.abs(value).max() > 0, w.path  # Drawn, not zeros.
  aux = derived.auxiliary_head.classifier.bias.numpy()
  assert np.abs(aux).max() <= 1 / math.sqrt(768)


def test_shufflenet_space_starts_as_the_spos_code_does():
  keras.utils.set_random_seed(0)
  space = helpers.tiny_block_space(stage_channels=(32, 64, 96, 128),
                                   head_channels=256)
  net = shufflenet.build_shufflenet_supernet(space, (16, 16, 3))
  checked = 0
  for w, depthwise in _kernels(net):
    value = np.asarray(w.numpy())
    if "stem_conv" in w.path or "classifier" in w.path:
      expected = 0.01
    elif depthwise:
      expected = 1.0
    else:
      expected = 1 / value.shape[-2]
    # Few draws (the stem, the classifier): a loose check, which still
    # tells N(0, 0.01) from Glorot's or N(0, 1/c)'s spread.
    rel = 0.1 if value.size >= 2000 else 0.5
    assert value.std() == pytest.approx(expected, rel=rel), w.path
    checked += 1
  assert checked >= 10
  assert not [w for w in net.trainable_weights if w.path.endswith("bias")]


@pytest.mark.parametrize("init", [initializers.FanInUniform(depthwise=True),
                                  initializers.InChannelsNormal(seed=3)])
def test_initializers_round_trip_through_keras_serialization(init):
  clone = keras.initializers.deserialize(keras.initializers.serialize(init))
  assert type(clone) is type(init)
  assert clone.get_config() == init.get_config()
