"""What a search checkpoint holds of a Keras network: all of its variables.

With Keras 3.15 on the TF backend, ``tf.train.Checkpoint(network=model)``
reaches only the layers held in plain attributes of the model: layers kept
in lists or dicts (the DARTS cells, the ShuffleNet blocks, a ChoiceBlock's
candidates, a MixedOp's ops) are Keras ``TrackedList``/``TrackedDict``
objects, which Keras converts for SavedModel export but not for
checkpoints. Their trainable weights still reached search checkpoints
through the optimizer's variable list, but their non-trainable variables
did not: BN moving statistics (what evaluation and an inherited-weight
child use) and dropout RNG states restarted from scratch on resume.
`ModelVariables` lists every variable of the model explicitly, keyed by its
position in ``model.variables`` (deterministic for a given architecture;
variable *paths* are not: Keras numbers random-generator states by a
process-wide counter).
"""

from __future__ import annotations

import tensorflow as tf


class ModelVariables(tf.Module):
  """Every variable of ``model`` (weights, BN statistics, RNG states)."""

  def __init__(self, model, name: str = "model_variables"):
    super().__init__(name=name)
    self.values = {f"v{i:05d}": getattr(v, "value", v)
                   for i, v in enumerate(model.variables)}
