"""Names of the search spaces (no TensorFlow import: the flags use them)."""

CELLS = "cells"
BLOCKS = "blocks"

#: DARTS cell space and the RobustDARTS variants (see spaces/darts.py).
CELL_SPACES = ("darts", "s2", "s3", "s4")
#: ShuffleNetV2 single-path spaces (see spaces/shufflenet.py).
BLOCK_SPACES = ("shufflenet", "shufflenet_small")
SPACES = CELL_SPACES + BLOCK_SPACES
