"""Raw ids in one canonical form, so that two files that spell an id differently still agree.

Spreadsheets and data-frame exports write the integer id 7 as ``7``, ``07``, ``7.0`` or
`` 7 ``; all of these are the id ``7``. Every other id is compared as written, without its
surrounding whitespace (``B00004TMFE``, ``7.5`` and ``1e3`` stay as they are).
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from llamarec.errors import LlamarecError

_INTEGER = re.compile(r"(?P<sign>[+-]?)(?P<digits>[0-9]+)(?:\.0*)?")


def canonical_id(value: str) -> str:
    """``"07"``, ``"7.0"``, ``"+7"`` and ``" 7 "`` become ``"7"``; other ids are only stripped.

    Works on the digits as text, so ids of any length keep every digit.
    """
    text = value.strip()
    match = _INTEGER.fullmatch(text)
    if match is None:
        return text
    digits = match["digits"].lstrip("0") or "0"
    return f"-{digits}" if match["sign"] == "-" and digits != "0" else digits


def canonical_ids(frame: pd.DataFrame, column: str, path: Path) -> pd.Series:
    """``column`` in canonical form; two rows whose different spellings mean the same id are
    an error naming both lines (for tables where each id appears once, such as items.csv)."""
    keys = frame[column].map(canonical_id)
    dup = keys.duplicated(keep=False)
    if dup.any():
        first = keys[dup].iloc[0]
        rows = frame.loc[dup & (keys == first)]
        lines, spelled = rows["_line"].tolist(), rows[column].tolist()
        raise LlamarecError(
            f"{path} lines {lines[0]} and {lines[1]}: {column} values {spelled[0]!r} and "
            f"{spelled[1]!r} are the same id ({first!r}); expected each {column} once"
        )
    return keys
