"""Text every layer reads the same way: cleaning (NFC, line ends, invisible characters, spaces) and ``{field}``
templates (their fields, and filling them with a clear error naming the params key)."""

from __future__ import annotations

import re
import string
import unicodedata

from loraops.core.errors import DataError

_SPACES = re.compile(r"[ \t\u00a0\u3000]+")
_INVISIBLE = re.compile("[\u200b\u200c\u200d\u2060\ufeff\u00ad]")
"""Zero-width spaces and joiners, word joiner, BOM, soft hyphen: invisible, and they split morphemes and tokens."""
_LINE_BREAKS = str.maketrans({"\u2028": "\n", "\u2029": "\n", "\u0085": "\n", "\x0b": "\n", "\x0c": "\n"})


def clean_text(text: str) -> str:
    """NFC-normalise, unify line ends, collapse runs of spaces, strip each line and the whole."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n").translate(_LINE_BREAKS)
    text = _INVISIBLE.sub("", text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def template_fields(template: str) -> list[str]:
    """Names of the ``{fields}`` a prompt template uses."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def fill(template: str, values: dict[str, str], key: str) -> str:
    """``template`` with its fields from ``values``.

    Raises:
        DataError: a field ``values`` lacks, naming the dotted ``key`` of the template.
    """
    missing = [name for name in template_fields(template) if name not in values]
    if missing:
        raise DataError(
            f"{key} uses {{{missing[0]}}}, which the data does not have; "
            f"available: {', '.join(sorted(values))} (add it to data.attribute_columns)"
        )
    return template.format(**values)
