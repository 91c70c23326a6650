"""fedsim: federated fine-tuning of language models with low-rank adapters, simulated on Ray."""

__version__ = "0.1.0"
