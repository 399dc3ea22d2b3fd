"""Freeing the eager kernels a supernet's build call leaves behind."""

import tensorflow as tf

from tfnas import eager_cache
from tfnas.spaces import darts as darts_space
from tfnas.spaces import shufflenet
from tests import helpers


class ReleaseBuildKernelsTest(tf.test.TestCase):

  def test_clears_the_eager_kernel_cache(self):
    # A seeded eager random op keeps its generator in its cached kernel:
    # the second draw differs from the first; once the cache is cleared, the
    # kernel is made anew and draws the first values again.
    eager_cache.release_build_kernels()  # Whatever ran before this test.
    first = tf.random.uniform([4], seed=5)
    self.assertNotAllClose(first, tf.random.uniform([4], seed=5))
    self.assertTrue(eager_cache.release_build_kernels())
    self.assertAllClose(first, tf.random.uniform([4], seed=5))
    self.assertAllClose(tf.constant(2.0) * 3.0, 6.0)  # Eager ops still run.

  def test_building_a_supernet_releases_its_kernels(self):
    builds = (
        lambda: darts_space.build_search_network(helpers.tiny_space(),
                                                 (8, 8, 3)),
        lambda: shufflenet.build_shufflenet_supernet(
            shufflenet.ShuffleNetSpaceConfig.small(input_size=8)))
    for seed, build in enumerate(builds, 6):
      eager_cache.release_build_kernels()
      first = tf.random.uniform([4], seed=seed)
      self.assertNotAllClose(first, tf.random.uniform([4], seed=seed))
      build()
      self.assertAllClose(first, tf.random.uniform([4], seed=seed))

  def test_does_nothing_in_a_graph(self):
    self.assertFalse(tf.function(eager_cache.release_build_kernels)())


if __name__ == "__main__":
  tf.test.main()
