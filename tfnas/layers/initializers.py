"""Weight initialisers of the searched spaces' released implementations.

Keras' defaults (Glorot-uniform kernels, zero biases) are not what the
papers' code started from, and although almost every convolution here is
followed by a BatchNorm (so the forward pass does not depend on a kernel's
scale), the scale sets the effective step size of SGD with weight decay,
early in a search and over a long retraining. Two conventions:

* ``"torch"``: PyTorch's default for ``Conv2d`` and ``Linear``, which the
  DARTS cell space's code (DARTS; SNAS and DSNAS there, built on it) never
  overrides: kernel and bias ``U(-b, b)``, ``b = 1/sqrt(fan_in)``, where
  ``fan_in`` is the kernel area times the input channels per group (a
  depthwise kernel: its area alone). That is PyTorch's rule since 1.0; the
  0.3 release the DARTS code was first run on counted every input channel
  of a depthwise kernel (a bound ``sqrt(C)`` times smaller); dense and
  ordinary convolution kernels are the same under both.
* ``"spos"``: the ShuffleNetV2 single-path space's (the SPOS/DSNAS code):
  convolution kernels ``N(0, 1/c)`` with ``c`` the input channels per group
  (1 for a depthwise kernel; the standard deviation is ``1/c``, not
  ``1/sqrt(c)``), the stem convolution and the classifier ``N(0, 0.01)``.

Both draw from Keras' seeded random ops, so ``keras.utils.set_random_seed``
makes them reproducible as the built-in initialisers are.
"""

from __future__ import annotations

import math

import keras


def _in_per_group(shape, depthwise: bool) -> int:
  """Input channels per group of a Keras kernel: ``[kh, kw, in, out]``
  (convolution), ``[kh, kw, in, multiplier]`` (depthwise: one per group) or
  ``[in, out]`` (dense)."""
  return 1 if depthwise else int(shape[-2])


def _area(shape) -> int:
  return int(math.prod(shape[:-2]))


@keras.saving.register_keras_serializable(package="tfnas")
class FanInUniform(keras.initializers.RandomUniform):
  """PyTorch's default kernel: ``U(-b, b)``, ``b = 1/sqrt(fan_in)``."""

  def __init__(self, depthwise: bool = False, seed=None):
    super().__init__(seed=seed)
    self.depthwise = depthwise

  def __call__(self, shape, dtype=None):
    bound = 1.0 / math.sqrt(
        _area(shape) * _in_per_group(shape, self.depthwise))
    return keras.random.uniform(shape, minval=-bound, maxval=bound,
                                seed=self.seed, dtype=dtype)

  def get_config(self):
    return {"depthwise": self.depthwise, "seed": self._init_seed}


@keras.saving.register_keras_serializable(package="tfnas")
class InChannelsNormal(keras.initializers.RandomNormal):
  """The SPOS/DSNAS convolution kernel: ``N(0, 1/c)``, ``c`` the input
  channels per group."""

  def __init__(self, depthwise: bool = False, seed=None):
    super().__init__(seed=seed)
    self.depthwise = depthwise

  def __call__(self, shape, dtype=None):
    stddev = 1.0 / _in_per_group(shape, self.depthwise)
    return keras.random.normal(shape, mean=0.0, stddev=stddev,
                               seed=self.seed, dtype=dtype)

  def get_config(self):
    return {"depthwise": self.depthwise, "seed": self._init_seed}


def conv_kernel(convention: str = "torch", depthwise: bool = False):
  """The kernel initialiser of a (depthwise) convolution."""
  if convention == "torch":
    return FanInUniform(depthwise=depthwise)
  if convention == "spos":
    return InChannelsNormal(depthwise=depthwise)
  raise ValueError(f"unknown initialiser convention {convention!r}")


def torch_dense(units: int, fan_in: int, use_bias: bool = True,
                **kwargs) -> keras.layers.Dense:
  """A ``Dense`` layer initialised as PyTorch's ``Linear(fan_in, units)``."""
  bound = 1.0 / math.sqrt(fan_in)
  bias = keras.initializers.RandomUniform(-bound, bound)
  return keras.layers.Dense(units, use_bias=use_bias,
                            kernel_initializer=FanInUniform(),
                            bias_initializer=bias, **kwargs)


def spos_dense(units: int, **kwargs) -> keras.layers.Dense:
  """A bias-free ``Dense`` layer initialised ``N(0, 0.01)`` (the SPOS/DSNAS
  classifier)."""
  return keras.layers.Dense(
      units, use_bias=False,
      kernel_initializer=keras.initializers.RandomNormal(0.0, 0.01), **kwargs)
