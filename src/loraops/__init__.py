"""loraops: domain Q&A data → a gated, traceable LoRA adapter (Prefect + DVC + MLflow + peft)."""

__version__ = "0.1.0"
