"""Federated continual learning of MLLMs with attention-spectrum regularisation."""

__version__ = "0.1.0"
