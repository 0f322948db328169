"""fedlr: federated-learning simulation with low-rank codecs, privacy and pricing on Flower + Ray."""

__version__ = "0.1.0"
