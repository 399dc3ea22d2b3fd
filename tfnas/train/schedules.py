"""Learning-rate schedules: step (a scalar tensor) → rate.

The optimizers (`tfnas.train.optim`) call them with their step count.
"""

from __future__ import annotations

import math
from typing import Callable

import tensorflow as tf


def cosine_schedule(base_lr: float, min_lr: float, total_epochs: int,
                    steps_per_epoch: int, warmup_epochs: int = 0,
                    per_step: bool = False
                    ) -> Callable[[tf.Tensor], tf.Tensor]:
  """Cosine annealing from ``base_lr`` to ``min_lr``.

  By default the rate changes once per epoch (DARTS: epoch e of E takes
  ``min + (base - min) (1 + cos(pi e / E)) / 2``); ``per_step`` anneals every
  step instead. ``warmup_epochs`` > 0 first raises the rate linearly, step t
  of the W warm-up steps taking ``base_lr (t + 1) / W``, then anneals over the
  remaining epochs (the ImageNet recipe of large-batch single-path search).
  """
  warmup_steps = warmup_epochs * steps_per_epoch
  anneal_epochs = max(total_epochs - warmup_epochs, 1)
  anneal_steps = max(total_epochs * steps_per_epoch - warmup_steps, 1)

  def lr(step):
    step = tf.cast(step, tf.int64)
    since = tf.maximum(step - warmup_steps, 0)
    if per_step:
      frac = tf.cast(since, tf.float32) / float(anneal_steps)
    else:
      frac = tf.cast(since // steps_per_epoch, tf.float32) / anneal_epochs
    frac = tf.minimum(frac, 1.0)
    rate = min_lr + 0.5 * (base_lr - min_lr) * (1.0 + tf.cos(math.pi * frac))
    if not warmup_steps:
      return rate
    warm = base_lr * tf.cast(step + 1, tf.float32) / float(warmup_steps)
    return tf.where(step < warmup_steps, warm, rate)
  return lr


def exponential_schedule(base_lr: float, decay: float,
                         steps_per_epoch: int) -> Callable[[tf.Tensor], tf.Tensor]:
  """``base_lr * decay ** epoch`` (DARTS/SNAS ImageNet: 0.1, 0.97)."""
  def lr(step):
    epoch = tf.cast(step // steps_per_epoch, tf.float32)
    return base_lr * tf.pow(tf.constant(decay, tf.float32), epoch)
  return lr


def constant_schedule(value: float) -> Callable[[tf.Tensor], tf.Tensor]:
  return lambda step: tf.constant(value, tf.float32)
