"""tfnas: stochastic and differentiable neural architecture search in TensorFlow/Keras."""

__version__ = "0.1.0"
