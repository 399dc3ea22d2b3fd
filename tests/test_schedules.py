"""Learning-rate schedules against their closed forms."""

import numpy as np

from tfnas.train import schedules


def at(lr, step):
  return float(lr(np.int64(step)))


def test_cosine_schedule():
  lr = schedules.cosine_schedule(0.025, 0.001, total_epochs=10,
                                 steps_per_epoch=5)
  np.testing.assert_allclose([at(lr, s) for s in (0, 4, 25, 50)],
                             [0.025, 0.025, 0.013, 0.001],  # Per epoch.
                             rtol=1e-6)


def test_cosine_schedule_with_warm_up_and_per_step():
  """Linear warm-up over 2 epochs of 5 steps, then cosine over the other 8
  epochs (per epoch), or over the other 40 steps (per step)."""
  per_epoch = schedules.cosine_schedule(0.5, 0.0, total_epochs=10,
                                        steps_per_epoch=5, warmup_epochs=2)
  for t in range(10):
    np.testing.assert_allclose(at(per_epoch, t), 0.5 * (t + 1) / 10,
                               rtol=1e-6)
  for t in range(10, 51):
    e = (t - 10) // 5
    np.testing.assert_allclose(
        at(per_epoch, t), 0.25 * (1 + np.cos(np.pi * min(e / 8, 1.0))),
        atol=1e-7)
  per_step = schedules.cosine_schedule(0.5, 0.1, total_epochs=10,
                                       steps_per_epoch=5, warmup_epochs=2,
                                       per_step=True)
  np.testing.assert_allclose(at(per_step, 9), 0.5)  # The last warm-up step.
  for t in range(10, 51):
    np.testing.assert_allclose(at(per_step, t), 0.1 + 0.2 * (
        1 + np.cos(np.pi * min((t - 10) / 40, 1.0))), atol=1e-7)
  plain = schedules.cosine_schedule(0.5, 0.0, total_epochs=10,
                                    steps_per_epoch=5, per_step=True)
  np.testing.assert_allclose(at(plain, 0), 0.5)
  np.testing.assert_allclose(at(plain, 25), 0.25, rtol=1e-6)
  np.testing.assert_allclose(at(plain, 7),
                             0.25 * (1 + np.cos(np.pi * 7 / 50)), rtol=1e-6)


def test_exponential_schedule():
  lr = schedules.exponential_schedule(0.1, 0.97, steps_per_epoch=10)
  np.testing.assert_allclose([at(lr, s) for s in (0, 9, 10, 25)],
                             [0.1, 0.1, 0.097, 0.1 * 0.97 ** 2], rtol=1e-6)


def test_constant_schedule():
  lr = schedules.constant_schedule(0.3)
  np.testing.assert_allclose([at(lr, s) for s in (0, 1000)], [0.3, 0.3],
                             rtol=1e-7)
