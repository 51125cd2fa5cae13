"""loraplex server: one frozen base model, many adapters, one batched forward."""

__version__ = "0.1.0"
