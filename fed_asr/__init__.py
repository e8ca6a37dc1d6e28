"""fed-asr: federated continual learning for MLLMs with Attention-Spectrum Regularization."""

__version__ = "0.1.0"
