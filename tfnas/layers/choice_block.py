"""ChoiceBlock: one searchable ShuffleNetV2 block of the SPOS/DSNAS space.

DSNAS section 4.2 searches the single-path space of SPOS (Guo et al. 2019):
20 ShuffleNetV2 blocks, each choosing one of four candidates, ``choice_3``,
``choice_5``, ``choice_7`` (ShuffleNetV2 units with a k×k depthwise conv) and
``choice_x`` (an Xception-like unit of three depthwise-separable convs).

Layouts follow the official DSNAS/SPOS code (``SNAS-Series/DSNAS/blocks.py``,
``network.py``):

* middle channels ``mid = out_channels // 2`` (``base_mid_channels = outp //
  2`` there), for every choice and both strides;
* each choice of a stride-2 block owns its projection branch, whose depthwise
  kernel is the choice's kernel (k for ``choice_k``, 3 for ``choice_x``).
  The per-block FLOPs table in that ``network.py`` confirms both: block 0,
  ``choice_3`` = 13 396 992 multiply-adds only with a 3×3 projection and
  ``choice_5`` = 15 805 440 only with a 5×5 one.

Channel routing is the official code's. There a stride-1 block starts by
sending the even channels of its input to the identity half and the odd ones
to the branch, and no block shuffles its output. Here every block ends with
`block_shuffle` (even channels first, then odd: a channel shuffle with
``C / 2`` groups) and a stride-1 block splits its input into first and second
halves, which is the same routing: block by block each output here is the
official block's output with that one permutation applied, and the last one
only reorders the input channels of the head's 1×1 conv. (The ShuffleNetV2
paper's shuffle with 2 groups would route differently after a stride-2 block
whose projection and main branch differ in width, 16 + 48 and 64 + 96
channels in the first two stages: the next block's branch would see none of
the 16 projected channels instead of 8 of them.)
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from tfnas.layers import shared_function, switch_path
from tfnas.layers.batch_norm import BatchNorm
from tfnas.layers.initializers import conv_kernel

#: Candidate names of the SPOS/DSNAS space and their depthwise kernel size.
CHOICE_KERNELS = {"choice_3": 3, "choice_5": 5, "choice_7": 7, "choice_x": 3}
SHUFFLENET_CHOICES = tuple(CHOICE_KERNELS)


def channel_shuffle(x, groups: int):
  """ShuffleNet channel shuffle (ShuffleNetV1 section 3.1).

  Views the channels as a ``[groups, C // groups]`` matrix and transposes it,
  so channel ``g * (C // groups) + i`` moves to position ``i * groups + g``:
  with 8 channels and 2 groups, ``[0..7]`` becomes ``[0, 4, 1, 5, 2, 6, 3, 7]``.

  Args:
    x: ``[B, H, W, C]`` tensor (any rank; the last axis is shuffled).
    groups: number of groups; must divide ``C``.

  Returns:
    A tensor shaped like ``x`` with permuted channels.

  Raises:
    ValueError: if ``groups`` does not divide the channel count.
  """
  channels = x.shape[-1]
  if groups < 1 or channels is None or channels % groups:
    raise ValueError(f"channel_shuffle needs groups >= 1 dividing the "
                     f"channel count, got groups={groups} for {channels} "
                     f"channels")
  # Leading dims may be dynamic (batch); only the channel axis is static.
  lead = tf.shape(x)[:-1]
  y = tf.reshape(x, tf.concat([lead, [groups, channels // groups]], 0))
  rank = y.shape.rank
  y = tf.transpose(y, list(range(rank - 2)) + [rank - 1, rank - 2])
  return tf.reshape(y, tf.shape(x))


def block_shuffle(x):
  """The permutation ending every `ChoiceBlock`: even channels, then odd
  ones (`channel_shuffle` with ``C / 2`` groups), so that the next stride-1
  block's halves are the official code's even/odd split (module docstring).
  With 8 channels ``[0..7]`` becomes ``[0, 2, 4, 6, 1, 3, 5, 7]``."""
  return channel_shuffle(x, x.shape[-1] // 2)


def _candidate_body(layer, static, inputs, gate):
  """Shared-function body: one candidate's outputs, times the gate."""
  (training,) = static
  outs = layer(inputs, training=training)
  if gate is not None:
    outs = [o * tf.cast(gate, o.dtype) for o in outs]
  return outs


def _candidate_variables(layer, static):
  del static
  return layer.variables


def _pad(x, pad):
  return tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])


@keras.saving.register_keras_serializable(package="tfnas")
class _ConvBNStack(keras.layers.Layer):
  """A chain of depthwise / pointwise convs, each followed by BN.

  Every unit of the ShuffleNetV2 branches follows one rule: a depthwise conv
  is followed by BN only, a pointwise (1×1) conv by BN and ReLU. ``spec``
  lists the convs in order: ``("dw", kernel, stride)`` or ``("pw",
  channels)``. Strided depthwise convs pad ``kernel // 2`` symmetrically
  (as PyTorch does) instead of TF's asymmetric 'SAME'.

  Input ``[B, H, W, C]``; output ``[B, ceil(H/s), ceil(W/s), C']`` with ``s``
  the product of strides and ``C'`` the last pointwise width (or ``C``).

  Args:
    spec: sequence of conv specs as above.
    **kwargs: forwarded to ``keras.layers.Layer``.
  """

  def __init__(self, spec: Sequence[Sequence], **kwargs):
    super().__init__(**kwargs)
    self.spec = tuple(tuple(s) for s in spec)
    self.convs = []
    self.bns = []
    for i, unit in enumerate(self.spec):
      if unit[0] == "dw":
        _, kernel, stride = unit
        if kernel % 2 != 1 or stride not in (1, 2):
          raise ValueError(f"depthwise unit {i} needs an odd kernel and "
                           f"stride 1 or 2, got {unit}")
        conv = keras.layers.DepthwiseConv2D(
            kernel, strides=stride, padding="same" if stride == 1 else "valid",
            use_bias=False,
            depthwise_initializer=conv_kernel("spos", depthwise=True),
            dtype=self.dtype_policy, name=f"dw{i}")
      elif unit[0] == "pw":
        conv = keras.layers.Conv2D(unit[1], 1, use_bias=False,
                                   kernel_initializer=conv_kernel("spos"),
                                   dtype=self.dtype_policy, name=f"pw{i}")
      else:
        raise ValueError(f"unit {i} of spec must be ('dw', kernel, stride) or "
                         f"('pw', channels), got {unit}")
      self.convs.append(conv)
      self.bns.append(BatchNorm(dtype=self.dtype_policy, name=f"bn{i}"))

  def build(self, input_shape):
    self.built = True  # Sublayers build on first call (fast Keras 3 build).

  def call(self, inputs, training=None):
    x = inputs
    for unit, conv, bn in zip(self.spec, self.convs, self.bns):
      if unit[0] == "dw" and unit[2] != 1:
        x = _pad(x, unit[1] // 2)
      x = bn(conv(x), training=training)
      if unit[0] == "pw":
        x = tf.nn.relu(x)
    return x

  def get_config(self):
    config = super().get_config()
    config.update(spec=[list(s) for s in self.spec])
    return config


def choice_branch_spec(choice: str, in_channels: int, mid_channels: int,
                       out_channels: int, stride: int) -> tuple:
  """The main-branch spec of one candidate (SPOS ``branch_main``).

  ``choice_k``: 1×1 (in → mid) → depthwise k×k (stride) → 1×1 (mid → out).
  ``choice_x``: three units depthwise 3×3 → 1×1; the first depthwise carries
  the stride, the 1×1 convs map in → mid → mid → out.
  """
  if choice not in CHOICE_KERNELS:
    raise ValueError(f"unknown choice {choice!r}; known choices: "
                     f"{SHUFFLENET_CHOICES}")
  if choice == "choice_x":
    return (("dw", 3, stride), ("pw", mid_channels),
            ("dw", 3, 1), ("pw", mid_channels),
            ("dw", 3, 1), ("pw", out_channels))
  del in_channels  # The first 1×1 conv infers it.
  return (("pw", mid_channels), ("dw", CHOICE_KERNELS[choice], stride),
          ("pw", out_channels))


@keras.saving.register_keras_serializable(package="tfnas")
class _Candidate(keras.layers.Layer):
  """One candidate of a ChoiceBlock: its main branch and, at stride 2, its
  own projection branch (depthwise k×k stride 2 → BN → 1×1 → BN-ReLU).

  ``call`` returns a list of the candidate's own outputs: ``[branch]`` at
  stride 1 (input: the branch half), ``[projection, branch]`` at stride 2
  (input: the whole block input).

  Args:
    choice: candidate name, a key of ``CHOICE_KERNELS``.
    in_channels: channels the candidate sees (half the block input at
      stride 1, all of it at stride 2).
    mid_channels: middle width of the main branch.
    out_channels: main-branch output channels.
    stride: 1 or 2.
    **kwargs: forwarded to ``keras.layers.Layer``.
  """

  def __init__(self, choice: str, in_channels: int, mid_channels: int,
               out_channels: int, stride: int, **kwargs):
    super().__init__(**kwargs)
    self.choice = choice
    self.in_channels = in_channels
    self.mid_channels = mid_channels
    self.out_channels = out_channels
    self.stride = stride
    self.branch = _ConvBNStack(
        choice_branch_spec(choice, in_channels, mid_channels, out_channels,
                           stride), dtype=self.dtype_policy, name="branch")
    self.projection = None
    if stride == 2:
      self.projection = _ConvBNStack(
          (("dw", CHOICE_KERNELS[choice], 2), ("pw", in_channels)),
          dtype=self.dtype_policy, name="projection")

  def build(self, input_shape):
    self.built = True

  def call(self, inputs, training=None):
    branch = self.branch(inputs, training=training)
    if self.projection is None:
      return [branch]
    return [self.projection(inputs, training=training), branch]

  def get_config(self):
    config = super().get_config()
    config.update(choice=self.choice, in_channels=self.in_channels,
                  mid_channels=self.mid_channels,
                  out_channels=self.out_channels, stride=self.stride)
    return config


class _JoinedCandidate:
  """A candidate as one `switch_path` branch: its outputs concatenated
  along channels (one tensor; at stride 1 it has one output anyway)."""

  def __init__(self, candidate: _Candidate):
    self.candidate = candidate

  @property
  def variables(self) -> list:
    return self.candidate.variables

  def __call__(self, inputs, training=None):
    outs = self.candidate(inputs, training=training)
    return outs[0] if len(outs) == 1 else tf.concat(outs, axis=-1)


@keras.saving.register_keras_serializable(package="tfnas")
class ChoiceBlock(keras.layers.Layer):
  """A searchable ShuffleNetV2 block (DSNAS section 4.2, SPOS section 3.3).

  Stride 1 (``out_channels`` must equal ``in_channels``): the input is split
  into halves; the first half passes unchanged, the chosen candidate maps the
  second half ``in/2 → out - in/2``; concat, `block_shuffle`.
  Stride 2: the chosen candidate's projection maps the whole input
  ``in → in`` and its main branch ``in → out - in``, both at stride 2;
  concat, `block_shuffle`. (The official code's routing; module docstring.)

  Input ``[B, H, W, in_channels]``; output
  ``[B, ceil(H/s), ceil(W/s), out_channels]``.

  ``call(inputs, index=None, gate=None, weights=None, training=None)``:
    * single path: ``index`` (Python int into ``choices``) selects one
      candidate; only its layers run, are traced and get built. ``gate``
      (optional scalar tensor, value 1) multiplies the block's whole output
      (at stride 1 the identity half as well as the branch): DSNAS's
      "dummy 1" after the chosen feature map (section 3.3, eq. 6,
      Algorithm 1), whose gradient ``∂L/∂gate = <∂L/∂o, o>`` is the
      search signal.
    * switched single path: ``index`` an int32 scalar tensor; the candidate
      is chosen at run time (`switch_path.call_switch`: one traced graph
      serves every choice, only the chosen one executes and it is
      recomputed in backprop). Every candidate must be built. An index
      outside ``choices`` fails when the step runs
      (``tf.errors.InvalidArgumentError``), not when it is traced.
    * mixed: ``weights`` (``[len(choices)]``) gives ``Σ_k w_k o_k`` over the
      candidates' whole block outputs (SNAS-style); the identity half they
      share is weighted by ``Σ_k w_k``.

  Args:
    in_channels: input channels (even at stride 1).
    out_channels: output channels.
    stride: 1 or 2.
    choices: candidate names, the order ``index`` and ``weights`` refer to.
    mid_channels: main-branch middle width; ``None`` gives the SPOS value
      ``out_channels // 2``.
    shared_functions: in single-path mode, run a built candidate as a
      ``tf.function`` shared by every candidate of the same structure and
      input shape (`shared_function.call_shared`): an eager single-path step
      then executes already-traced graphs, and tracing stays bounded by
      (structures × shapes) however many children are sampled. False runs
      inline (same results).
    **kwargs: forwarded to ``keras.layers.Layer``.
  """

  def __init__(self, in_channels: int, out_channels: int, stride: int,
               choices: Sequence[str] = SHUFFLENET_CHOICES,
               mid_channels: int | None = None, shared_functions: bool = True,
               **kwargs):
    super().__init__(**kwargs)
    if stride not in (1, 2):
      raise ValueError(f"stride must be 1 or 2, got {stride}")
    if stride == 1:
      if in_channels % 2:
        raise ValueError(f"a stride-1 ChoiceBlock splits its input in halves "
                         f"and needs even in_channels, got {in_channels}")
      if out_channels != in_channels:
        raise ValueError(f"a stride-1 ChoiceBlock keeps its width: "
                         f"out_channels={out_channels} != "
                         f"in_channels={in_channels}")
    elif out_channels <= in_channels:
      raise ValueError(f"a stride-2 ChoiceBlock must widen: out_channels="
                       f"{out_channels} <= in_channels={in_channels}")
    if out_channels % 2:
      raise ValueError(f"the channel shuffle after a block needs even "
                       f"out_channels, got {out_channels}")
    choices = tuple(choices)
    unknown = [c for c in choices if c not in CHOICE_KERNELS]
    if unknown or not choices or len(set(choices)) != len(choices):
      raise ValueError(f"choices must be distinct names from "
                       f"{SHUFFLENET_CHOICES}, got {choices}")
    if mid_channels is None:
      mid_channels = out_channels // 2
    if mid_channels < 1:
      raise ValueError(f"mid_channels must be >= 1, got {mid_channels}")
    self.in_channels = in_channels
    self.out_channels = out_channels
    self.stride = stride
    self.choices = choices
    self.mid_channels = mid_channels
    self.shared_functions = shared_functions
    self.candidates = {
        name: _Candidate(name, self.branch_in_channels, mid_channels,
                            self.branch_out_channels, stride,
                            dtype=self.dtype_policy, name=name)
        for name in choices}

  @property
  def branch_in_channels(self) -> int:
    """Channels the candidates see: half the input at stride 1, else all."""
    return self.in_channels // 2 if self.stride == 1 else self.in_channels

  @property
  def branch_out_channels(self) -> int:
    """Main-branch output channels: ``out - in/2`` (s=1), ``out - in`` (s=2)."""
    return self.out_channels - self.branch_in_channels

  def build(self, input_shape):
    self.built = True  # Candidates build on first use, so unused ones never do.

  def call(self, inputs, index=None, gate=None, weights=None, training=None):
    if inputs.shape[-1] != self.in_channels:
      raise ValueError(f"ChoiceBlock {self.name!r} expects {self.in_channels} "
                       f"input channels, got shape {inputs.shape}")
    if self.stride == 1:
      half = self.in_channels // 2
      shortcut, x = inputs[..., :half], inputs[..., half:]
    else:
      shortcut, x = None, inputs
    if isinstance(index, (tf.Tensor, tf.Variable)):
      out = self._switched(x, index, gate, training)
      if self.stride == 2:  # Projection and main branch, already joined.
        return block_shuffle(out)
      outs = [out]  # The identity half is gated below, as for an int.
    elif index is not None:
      index = int(index)
      if not 0 <= index < len(self.choices):
        raise ValueError(f"index {index} out of range for "
                         f"{len(self.choices)} choices {self.choices}")
      candidate = self.candidates[self.choices[index]]
      if self._can_share([candidate], training):
        outs = shared_function.call_shared(
            candidate, _candidate_body, _candidate_variables, (x, gate),
            (bool(training),))
      else:
        outs = _candidate_body(candidate, (training,), x, gate)
    elif weights is not None:
      outs = None
      for k, name in enumerate(self.choices):
        terms = self.candidates[name](x, training=training)
        terms = [tf.cast(weights[k], t.dtype) * t for t in terms]
        outs = terms if outs is None else [a + b for a, b in zip(outs, terms)]
    else:
      raise ValueError(f"ChoiceBlock {self.name!r} needs an index (single "
                       f"path) or weights (mixed mode), got neither")
    if self.stride == 2:
      left = outs[0]
    elif index is not None:
      # The gate multiplies the whole block output (DSNAS Algorithm 1: a
      # dummy 1 after each chosen feature map): the identity half too.
      left = shortcut if gate is None else shortcut * tf.cast(
          gate, shortcut.dtype)
    else:
      # Σ_k w_k · block_k(x): the shared identity half weighs Σ_k w_k.
      left = shortcut * tf.cast(tf.reduce_sum(weights), shortcut.dtype)
    return block_shuffle(tf.concat([left, outs[-1]], axis=-1))

  def switch_branches(self) -> list["_JoinedCandidate"]:
    """The candidates in ``choices`` order, each giving one tensor
    (`switch_path`): the main branch at stride 1; at stride 2 the projection
    and the main branch concatenated, as the block concatenates them."""
    return [_JoinedCandidate(self.candidates[name]) for name in self.choices]

  def _switched(self, x, index, gate, training):
    """The candidate ``index`` (an int32 tensor into ``choices``) through
    `switch_path.call_switch`, times ``gate``."""
    if not self._can_share(list(self.candidates.values()), training):
      raise ValueError(f"ChoiceBlock {self.name!r}: a tensor index needs "
                       "every candidate built, a Python `training`, shared "
                       "functions and, under several replicas, per-replica "
                       "(not synchronized) batch norm")
    index = tf.cast(index, tf.int32)
    n = len(self.choices)
    # An index past the choices would silently run the last one.
    tf.debugging.Assert(
        tf.logical_and(index >= 0, index < n),
        [f"ChoiceBlock {self.name}: index out of range for {n} choices:",
         index])
    return switch_path.call_switch(self, x, index, training, gate)

  def _can_share(self, candidates, training) -> bool:
    """Whether a single-path call of ``candidates`` may go through shared
    (or switched) functions."""
    if not self.shared_functions:
      return False
    return shared_function.shareable(candidates, training)

  def compute_output_shape(self, input_shape):
    def down(n):
      return None if n is None else -(-n // self.stride)
    return (input_shape[0], down(input_shape[1]), down(input_shape[2]),
            self.out_channels)

  def get_config(self):
    config = super().get_config()
    config.update(in_channels=self.in_channels,
                  out_channels=self.out_channels, stride=self.stride,
                  choices=list(self.choices), mid_channels=self.mid_channels,
                  shared_functions=self.shared_functions)
    return config
