"""jaxsae: a fast, sharding-aware JAX trainer for sparse autoencoders on cached activations."""

__version__ = "0.3.0"
