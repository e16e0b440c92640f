"""MovieLens readers: ml-latest-small (CSV, UTF-8) and ml-100k (official files or RecBole's copy)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from llamarec.data.tables import RawData, read_table, reject_duplicates, to_number
from llamarec.data.titles import is_missing_title, movielens_title
from llamarec.errors import LlamarecError


def _ratings(frame: pd.DataFrame, path: Path, user: str, item: str, time: str) -> pd.DataFrame:
    out = pd.DataFrame({
        "user": to_number(frame, user, path, integer=True).astype(str),
        "item": to_number(frame, item, path, integer=True).astype(str),
        "time": to_number(frame, time, path),
        "_line": frame["_line"],
    })
    reject_duplicates(out, ["user", "item", "time"], path, "rating")
    return out.drop(columns="_line")


def _titles(ids: pd.Series, titles: pd.Series, frame: pd.DataFrame, path: Path
            ) -> tuple[pd.DataFrame, list[str]]:
    """The titled items, and the ids of the items listed without a title."""
    items = pd.DataFrame({"item": ids.astype(str), "title": titles, "_line": frame["_line"]})
    reject_duplicates(items, ["item"], path, "item id")
    missing = items["title"].map(is_missing_title)
    untitled = items.loc[missing, "item"].tolist()
    items = items[~missing]
    items["title"] = items["title"].map(movielens_title)
    return items.drop(columns="_line").reset_index(drop=True), untitled


def read_ml_latest_small(root: Path) -> RawData:
    """``ratings.csv`` (userId,movieId,rating,timestamp) and ``movies.csv`` (movieId,title,genres)."""
    rpath, mpath = root / "ratings.csv", root / "movies.csv"
    ratings = read_table(rpath, ["userId", "movieId", "timestamp"])
    movies = read_table(mpath, ["movieId", "title"])
    items, untitled = _titles(to_number(movies, "movieId", mpath, integer=True), movies["title"],
                              movies, mpath)
    return RawData(_ratings(ratings, rpath, "userId", "movieId", "timestamp"), items, str(root),
                   untitled)


def read_ml_100k(root: Path) -> RawData:
    """The official ``u.data`` (tab-separated) and ``u.item`` (pipe-separated, latin-1)."""
    dpath, ipath = root / "u.data", root / "u.item"
    data = read_table(dpath, ["user", "item", "rating", "time"], sep="\t",
                      names=["user", "item", "rating", "time"])
    meta = read_table(ipath, ["item", "title"], sep="|", encoding="latin-1",
                      names=["item", "title", *(f"f{i}" for i in range(22))])
    items, untitled = _titles(to_number(meta, "item", ipath, integer=True), meta["title"], meta, ipath)
    ratings = _ratings(data, dpath, "user", "item", "time")
    return check_ml_100k(RawData(ratings, items, str(root), untitled))


def read_ml_100k_recbole(root: Path) -> RawData:
    """RecBole's copy: ``ml-100k.inter`` and ``ml-100k.item`` (title and year in two columns)."""
    dpath, ipath = root / "ml-100k.inter", root / "ml-100k.item"
    data = read_table(dpath, ["user_id:token", "item_id:token", "timestamp:float"], sep="\t")
    meta = read_table(ipath, ["item_id:token", "movie_title:token_seq", "release_year:token"],
                      sep="\t")
    year = meta["release_year:token"].str.strip()
    raw_title = meta["movie_title:token_seq"].str.strip()
    title = raw_title.where(~year.str.fullmatch(r"\d{4}"), raw_title + " (" + year + ")")
    title = title.where(~raw_title.map(is_missing_title), "")
    items, untitled = _titles(to_number(meta, "item_id:token", ipath, integer=True), title, meta, ipath)
    ratings = _ratings(data, dpath, "user_id:token", "item_id:token", "timestamp:float")
    return check_ml_100k(RawData(ratings, items, str(root), untitled))


def check_ml_100k(raw: RawData) -> RawData:
    """ml-100k is a fixed release: anything but its known size means a wrong or damaged copy."""
    inter = raw.interactions
    got = (len(inter), inter["user"].nunique(), inter["item"].nunique())
    if got != (100_000, 943, 1_682):
        raise LlamarecError(
            f"{raw.source}: ml-100k should hold 100,000 ratings by 943 users of 1,682 items, "
            f"found {got[0]:,} / {got[1]:,} / {got[2]:,}"
        )
    return raw
