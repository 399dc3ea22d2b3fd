"""Search spaces by name: the config and supernet of each.

Two kinds of space share the loop: *cell* spaces (DARTS and its RobustDARTS
variants: decision groups ``normal``/``reduce``, one decision per edge) and
*block* spaces (the ShuffleNetV2 single-path space of SPOS/DSNAS: one group
``blocks``, one decision per choice block). Names are listed in
`tfnas.spaces.names` (importable without TensorFlow, for the flags).
"""

from __future__ import annotations

from typing import Any, Sequence

from tfnas.config import ConfigError, SearchConfig
from tfnas.errors import TfnasError
from tfnas.spaces import darts as darts_space
from tfnas.spaces import names
from tfnas.spaces import shufflenet


def space_kind(space) -> str:
  """``"cells"`` or ``"blocks"`` for a space config."""
  if isinstance(space, darts_space.DartsSpaceConfig):
    return names.CELLS
  if isinstance(space, shufflenet.ShuffleNetSpaceConfig):
    return names.BLOCKS
  raise TypeError(f"not a search-space config: {space!r}")


def space_config(config: Any, num_classes: int, image_size: int):
  """The space named by ``config.space`` sized for the dataset.

  Cell spaces take ``num_cells``, ``num_nodes``, ``channels`` and
  ``recompute`` from the config; ``shufflenet`` is the 20-block ImageNet
  space and ``shufflenet_small`` the 5-block preset for small inputs, both
  with the dataset's classes and input size, and with the stage repeats and
  widths, stem and head channels the config sets in place of the preset's.
  """
  name = config.space
  if name in names.CELL_SPACES:
    try:
      return darts_space.search_space(
          name, num_cells=config.num_cells, num_nodes=config.num_nodes,
          channels=config.channels, num_classes=num_classes,
          recompute=config.recompute, recompute_unit=config.recompute_unit,
          sync_batch_norm=config.sync_batch_norm)
    except ValueError as e:
      raise ConfigError(f"--space={name}: {e}") from None
  if name in names.BLOCK_SPACES:
    preset = (shufflenet.ShuffleNetSpaceConfig if name == "shufflenet" else
              shufflenet.ShuffleNetSpaceConfig.small)
    overrides = config.shufflenet_overrides()
    try:
      return preset(num_classes=num_classes, input_size=image_size,
                    sync_batch_norm=config.sync_batch_norm, **overrides)
    except ValueError as e:
      shown = " ".join(f"--{k}={_flag_value(v)}" for k, v in overrides.items())
      raise ConfigError(f"--space={name} {shown}: {e}") from None
  raise TfnasError(f"unknown search space {name!r}; known spaces: "
                   f"{list(names.SPACES)}")


def space_warnings(space, image_size: int) -> list[str]:
  """Valid settings under which a search in ``space`` on ``image_size``-
  pixel images learns less than it appears to (the space's `warnings`,
  and for cell spaces the cells that see 1×1 feature maps)."""
  found = list(space.warnings())
  if space_kind(space) == names.CELLS:
    found += space.input_warnings(image_size)
  return found


def resolved_shape(config: dict[str, Any]) -> dict[str, Any]:
  """A config dict (``SearchConfig.to_dict()`` or a saved config.json) with
  each ShuffleNet shape field left to its ``--space`` preset (empty or 0)
  replaced by the preset's value: a run started on the preset and resumed
  with the same shape spelt out (or the other way round) is the same run.
  Other spaces' configs are returned unchanged."""
  name = config.get("space")
  if name not in names.BLOCK_SPACES:
    return config
  preset = (shufflenet.ShuffleNetSpaceConfig() if name == "shufflenet" else
            shufflenet.ShuffleNetSpaceConfig.small())
  resolved = dict(config)
  for field in SearchConfig.SHUFFLENET_SHAPE:
    if not resolved.get(field):
      value = getattr(preset, field)
      resolved[field] = list(value) if isinstance(value, tuple) else value
  return resolved


def _flag_value(value) -> str:
  if isinstance(value, (tuple, list)):
    return ",".join(str(v) for v in value)
  return str(value)


def build_network(space, input_shape: Sequence[int]):
  """The built supernet of a space config (all variables created)."""
  if space_kind(space) == names.CELLS:
    return darts_space.build_search_network(space, input_shape)
  return shufflenet.build_shufflenet_supernet(space, input_shape)
