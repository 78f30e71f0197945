"""The Korean morphological analyser, loaded once per process and model type.

kiwipiepy takes ~1 s to build an analyser and ~1.7 s more on its first sentence (it loads its language
model lazily). Metrics, the degeneracy detector, the speech-level classifier, the leakage guard, the
augmentation rules and the BM25 index all read Korean with it; one shared instance per model type
costs that once per process instead of once per user. Nobody adds user words to it, so sharing cannot
change what another caller sees.
"""

from __future__ import annotations

import functools
from typing import Any

DEFAULT = "kiwi-cong"
"""kiwipiepy's own default model ("cong"); ``eval.morph_analyzer`` may choose "kiwi-cong-global"."""


@functools.cache
def analyser(name: str = DEFAULT) -> Any:
    """The shared ``kiwipiepy.Kiwi`` for ``name`` (``kiwi-cong`` or ``kiwi-cong-global``)."""
    from kiwipiepy import Kiwi

    return Kiwi(model_type=name.removeprefix("kiwi-"))
