"""moealign: train, adapt and analyse the routers of Mixture-of-Experts language models."""

__version__ = "0.1.0"
