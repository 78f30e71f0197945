"""Every error loraops expects, under one base class: the CLI prints its message and exits 2.

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LoraopsError(Exception):
    """An expected failure; the message names the file and row or the dotted params key."""


class ConfigError(LoraopsError, ValueError):
    """Invalid parameters; the message lists every problem, one per line, each naming its key."""


class DataError(LoraopsError, ValueError):
    """Unusable input data; the message names the file and the line or column."""


class ModelError(LoraopsError, RuntimeError):
    """A base model, tokenizer or adapter cannot be loaded or used."""


class MetricError(LoraopsError, RuntimeError):
    """A metric cannot be built or is not valid for the gate; the message names the key and the figures."""


class RegistryError(LoraopsError, RuntimeError):
    """Unknown model/version/alias, missing lineage, or a refused registry operation."""


class StageError(LoraopsError, RuntimeError):
    """A DVC stage failed; its command already printed why."""


class TrackingError(LoraopsError, RuntimeError):
    """The MLflow tracking server did not answer within loraops' bounded retries."""
