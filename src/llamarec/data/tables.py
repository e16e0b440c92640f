"""Reading raw tables with validation that names the file, line and column on bad input."""

from __future__ import annotations

import io
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from llamarec.errors import LlamarecError

_LEADING_BLANK_LINES = re.compile(r"(?:[ \t]*\r?\n)*")


@dataclass
class RawData:
    """What every loader returns: interactions ``user, item, time`` and item ``item, title``.

    ``time`` orders a user's interactions (a Unix timestamp or a position); ids are strings,
    the same in both tables. ``items`` may have a ``raw_id`` column, the id as the items file
    spells it, shown instead of ``item``. ``untitled`` lists the items the items file names
    without a title (left out of ``items``). ``source`` says where the files came from.
    """

    interactions: pd.DataFrame
    items: pd.DataFrame
    source: str
    untitled: list[str] = field(default_factory=list)


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """Read a whole text file, turning a decoding error into a message with its line number."""
    if not path.is_file():
        raise LlamarecError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise LlamarecError(
            f"{path} line {line}: byte {data[exc.start]:#04x} is not valid {encoding}; "
            f"expected {encoding}-encoded text"
        ) from None
    text = text.removeprefix("\ufeff")  # a byte-order mark (Excel's "CSV UTF-8")
    if not text.strip():
        raise LlamarecError(f"{path}: file is empty")
    return text


def shown_columns(columns: Sequence[str]) -> str:
    """Column names for a one-line message: a name with line breaks or other unprintable
    characters is shown as a Python literal."""
    return ", ".join(c if c.isprintable() else repr(c) for c in map(str, columns) if c != "_line")


def read_table(
    path: Path,
    columns: Sequence[str],
    *,
    sep: str = ",",
    encoding: str = "utf-8",
    names: Sequence[str] | None = None,
    optional: Sequence[str] = (),
) -> pd.DataFrame:
    """Read a delimited file as strings and check that ``columns`` are present.

    With ``names`` the file has no header and its columns are given positionally. The result
    has a ``_line`` column holding each row's line number in the file, for error messages.
    """
    text = read_text(path, encoding)
    # Blank lines are read as rows (dropped below) so that line numbers can be counted exactly.
    lead = _LEADING_BLANK_LINES.match(text).end()
    try:
        frame = pd.read_csv(
            io.StringIO(text[lead:]), sep=sep, dtype=str, keep_default_na=False,
            header=None if names else 0, names=list(names) if names else None,
            quoting=3 if sep == "\t" or sep == "|" else 0, engine="c", skip_blank_lines=False,
        )
    except (pd.errors.ParserError, ValueError) as exc:
        raise LlamarecError(
            f"{path}: cannot parse as a {sep!r}-separated table: {str(exc).strip()}"
        ) from None
    if not names:
        _reject_duplicate_header(text[lead:], path, sep, text[:lead].count("\n") + 1)
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise LlamarecError(
            f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(columns)}"
            f"{' (and optionally ' + ', '.join(optional) + ')' if optional else ''}, "
            f"found {shown_columns(frame.columns)}"
        )
    # A row starts one line after the previous row ends; a quoted field may span several lines.
    first = text[:lead].count("\n") + (1 if names else 2)
    spans = 1 + frame.apply(lambda col: col.str.count("\n")).fillna(0).sum(axis=1).astype("int64")
    frame["_line"] = first + spans.cumsum() - spans
    empty = (frame.drop(columns="_line").apply(lambda col: col.str.strip()) == "").all(axis=1)
    if empty.any():  # rows of blank lines go; a row like ",," is data and is checked later
        lines = text.split("\n")
        blank = frame.loc[empty, "_line"].map(lambda n: n > len(lines) or not lines[n - 1].strip())
        frame = frame.drop(index=blank.index[blank]).reset_index(drop=True)
    if frame.empty:
        raise LlamarecError(f"{path}: no data rows")
    return frame


def _reject_duplicate_header(text: str, path: Path, sep: str, line: int) -> None:
    """A column named twice (pandas would silently rename the second copy ``name.1``)."""
    try:
        header = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False,
                             header=None, nrows=1, quoting=3 if sep in "\t|" else 0, engine="c")
    except (pd.errors.ParserError, ValueError):
        return  # the full parse reports it
    seen: dict[str, int] = {}
    for position, name in enumerate((str(c).strip() for c in header.iloc[0]), 1):
        if name and name in seen:
            raise LlamarecError(
                f"{path} line {line}: column {name!r} appears twice in the header (columns "
                f"{seen[name]} and {position}); expected each column name once"
            )
        seen.setdefault(name, position)


def require_nonempty(frame: pd.DataFrame, column: str, path: Path) -> None:
    """Every value of ``column`` must be a non-empty id without control characters (such as
    NUL bytes); values are stripped of surrounding whitespace."""
    values = frame[column].str.strip()
    bad = values == ""
    if bad.any():
        line = int(frame.loc[bad, "_line"].iloc[0])
        raise LlamarecError(f"{path} line {line}: column {column!r} is empty; expected an id")
    control = values.str.contains(r"[\x00-\x1f\x7f-\x9f]", regex=True)
    if control.any():
        row = frame.loc[control].iloc[0]
        char = next(c for c in row[column] if unicodedata.category(c) == "Cc")
        what = "a NUL byte" if char == "\x00" else f"the control character U+{ord(char):04X}"
        raise LlamarecError(
            f"{path} line {int(row['_line'])}: column {column!r} has value {row[column]!r} "
            f"with {what}; expected an id without control characters"
        )
    frame[column] = values


def to_number(frame: pd.DataFrame, column: str, path: Path, *, integer: bool = False) -> pd.Series:
    """Convert a column to finite numbers, naming the first line whose value is not one."""
    values = pd.to_numeric(frame[column].str.strip(), errors="coerce")
    infinite = values.isin([float("inf"), float("-inf")])
    bad = values.isna() | infinite
    if integer:
        bad |= values.notna() & ~infinite & ((values % 1 != 0) | (values.abs() >= 2.0**63))
    if bad.any():
        row = frame.loc[bad].iloc[0]
        kind = "an integer" if integer else "a finite number" if infinite[bad].iloc[0] else "a number"
        raise LlamarecError(
            f"{path} line {int(row['_line'])}: column {column!r} has value {row[column]!r}; "
            f"expected {kind}"
        )
    return values.astype("int64") if integer else values.astype("float64")


def _plain(value: object) -> object:
    """A numpy scalar as the Python value it holds, so that messages show ``1.0``."""
    return value.item() if hasattr(value, "item") else value


def reject_duplicates(frame: pd.DataFrame, key: Sequence[str], path: Path, what: str) -> None:
    """Raise on rows that repeat ``key``, naming both lines."""
    dup = frame.duplicated(list(key), keep=False)
    if dup.any():
        rows = frame.loc[dup].sort_values([*key, "_line"])
        first = rows.iloc[0]
        same = rows[(rows[list(key)] == first[list(key)]).all(axis=1)]["_line"].tolist()
        shown = ", ".join(f"{k}={_plain(first[k])!r}" for k in key)
        raise LlamarecError(
            f"{path} lines {same[0]} and {same[1]}: duplicate {what} ({shown}); "
            f"expected each {what} once"
        )
