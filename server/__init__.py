"""loraplex server: one frozen base model, many adapters, one batched forward."""

__version__ = "0.1.0"

from server.model.torchao_noise import silence_torchao_noise

silence_torchao_noise()  # before anything imports transformers (which imports torchao): see that module
