"""Amazon review data (McAuley et al.): raw ratings CSV plus a metadata file of titles."""

from __future__ import annotations

import ast
import gzip
import json
from pathlib import Path

import pandas as pd

from llamarec.data.tables import RawData, read_table, require_nonempty, to_number
from llamarec.data.titles import clean_title, is_missing_title
from llamarec.errors import LlamarecError


def _meta_record(line: str, path: Path, lineno: int) -> dict:
    """One metadata line: JSON (2018 files) or a Python literal (2014 files), never ``eval``."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        try:
            record = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise LlamarecError(
                f"{path} line {lineno}: not a JSON object or Python literal dict"
            ) from None
    if not isinstance(record, dict):
        raise LlamarecError(f"{path} line {lineno}: expected a dict with 'asin' and 'title'")
    return record


def read_meta_titles(path: Path) -> tuple[pd.DataFrame, list[str]]:
    """Item titles from a (gzipped) metadata file, and the ids of the items it lists without
    a title (left out of the titles)."""
    if not path.is_file():
        raise LlamarecError(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    titles: dict[str, str] = {}
    untitled: set[str] = set()
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                record = _meta_record(line, path, lineno)
                asin, title = record.get("asin"), record.get("title")
                if not isinstance(asin, str) or not asin.strip():
                    raise LlamarecError(f"{path} line {lineno}: missing 'asin'")
                if is_missing_title(title):
                    untitled.add(asin.strip())
                else:
                    titles.setdefault(asin.strip(), clean_title(title, unescape_html=True))
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise LlamarecError(f"{path}: cannot read metadata ({exc}); expected gzipped UTF-8 lines") from None
    if not titles:
        raise LlamarecError(f"{path}: no item has a title")
    items = pd.DataFrame({"item": list(titles), "title": list(titles.values())})
    return items.reset_index(drop=True), sorted(untitled.difference(titles))


def read_amazon_raw(root: Path, ratings_file: str, meta_file: str) -> RawData:
    """``ratings_<Category>.csv`` (user,item,rating,timestamp; no header) and the meta file."""
    rpath = root / ratings_file
    frame = read_table(rpath, ["user", "item", "rating", "time"],
                       names=["user", "item", "rating", "time"])
    for col in ("user", "item"):
        require_nonempty(frame, col, rpath)
    inter = pd.DataFrame({"user": frame["user"], "item": frame["item"],
                          "time": to_number(frame, "time", rpath)})
    # Raw Amazon ratings hold exact repeats; the paper keeps one interaction per (user, item, time).
    inter = inter.drop_duplicates(["user", "item", "time"]).reset_index(drop=True)
    items, untitled = read_meta_titles(root / meta_file)
    return RawData(inter, items, str(root), untitled)
