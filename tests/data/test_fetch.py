"""Verified downloads: https sources, pinned or first-download sha256 for every fetched file
(zip archives too), and cached raw files checked against what was fetched."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from llamarec.data import load_dataset
from llamarec.data.registry import (
    AMAZON_2018_META,
    DATASETS,
    GROUPLENS,
    SNAP,
    Source,
    _fetch_zip,
    get_spec,
    locate,
)
from llamarec.errors import LlamarecError
from llamarec.fetch import RECORDED_SHA256, check_recorded, download_url

ITEMS = "item_id,title\na,A\nb,B\nc,C\n"
INTERACTIONS = "user_id,item_id,position\nu,a,0\nu,b,1\nu,c,2\n"


def records(cache: Path) -> dict[str, str]:
    return json.loads((cache / RECORDED_SHA256).read_text(encoding="utf-8"))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_sources_use_https() -> None:
    assert all(url.startswith("https://") for url in (GROUPLENS, SNAP, AMAZON_2018_META))
    for spec in DATASETS.values():
        for source in spec.sources:
            assert "http://" not in source.describe, source.describe


def test_first_download_is_recorded_and_later_ones_verified(tmp_path: Path, llamarec_cache: Path) -> None:
    src = tmp_path / "ratings.csv"
    src.write_bytes(b"v1")
    url = src.as_uri()
    dest = tmp_path / "out" / "ratings.csv"
    download_url(url, dest, sha256=None)
    assert records(llamarec_cache) == {url: sha(b"v1")}
    download_url(url, dest, sha256=None)  # the same bytes again: fine
    src.write_bytes(b"v2, changed at the source")
    with pytest.raises(LlamarecError) as info:
        download_url(url, dest, sha256=None)
    msg = str(info.value)
    assert msg.startswith(f"download of {url}: sha256 {sha(b'v2, changed at the source')} is not the "
                          f"{sha(b'v1')} recorded when it was first downloaded")
    assert "\n" not in msg and str(llamarec_cache / RECORDED_SHA256) in msg
    assert dest.read_bytes() == b"v1"  # the earlier download is kept
    assert [p.name for p in dest.parent.iterdir()] == ["ratings.csv"]  # no temporary file left


def test_pinned_checksum_is_checked_and_not_recorded(tmp_path: Path, llamarec_cache: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"data")
    download_url(src.as_uri(), tmp_path / "a", sha256=sha(b"data"))
    with pytest.raises(LlamarecError, match="checksum mismatch"):
        download_url(src.as_uri(), tmp_path / "b", sha256=sha(b"other"))
    assert not (llamarec_cache / RECORDED_SHA256).exists()
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b"[1, 2]", b'{"u": 3}'])
def test_damaged_record_file_is_a_clear_error(tmp_path: Path, llamarec_cache: Path, content: bytes) -> None:
    (llamarec_cache / RECORDED_SHA256).write_bytes(content)
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(LlamarecError) as info:
        check_recorded(tmp_path / "f", "key")
    msg = str(info.value)
    assert msg.startswith(f"{llamarec_cache / RECORDED_SHA256}: ")
    assert msg.endswith("delete it to record the checksums again") and "\n" not in msg


def make_zip(path: Path, files: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return path


def test_zip_archives_are_recorded_after_extraction_and_verified(tmp_path: Path, llamarec_cache: Path) -> None:
    archive = make_zip(tmp_path / "data.zip", {"d/items.csv": ITEMS})
    url = archive.as_uri()
    out = tmp_path / "out"
    out.mkdir()
    _fetch_zip(url, {"d/items.csv": None}, out)
    assert (out / "items.csv").read_text() == ITEMS
    assert records(llamarec_cache) == {url: sha(archive.read_bytes())}
    make_zip(archive, {"d/items.csv": ITEMS + "d,D\n"})  # the archive changes at the source
    with pytest.raises(LlamarecError, match=f"download of {url}: sha256 .* is not the .* recorded"):
        _fetch_zip(url, {"d/items.csv": None}, out)


def test_broken_first_zip_is_not_recorded(tmp_path: Path, llamarec_cache: Path) -> None:
    bad = tmp_path / "data.zip"
    bad.write_bytes(b"<html>captive portal</html>")
    with pytest.raises(LlamarecError, match="not the expected archive"):
        _fetch_zip(bad.as_uri(), {"d/items.csv": None}, tmp_path)
    assert not (llamarec_cache / RECORDED_SHA256).exists()
    # the real archive, once there, is accepted and recorded
    make_zip(bad, {"d/items.csv": ITEMS})
    _fetch_zip(bad.as_uri(), {"d/items.csv": None}, tmp_path)
    assert records(llamarec_cache) == {bad.as_uri(): sha(bad.read_bytes())}


def test_zip_member_with_a_pinned_checksum(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "data.zip", {"d/items.csv": ITEMS})
    with pytest.raises(LlamarecError, match="d/items.csv does not match its known checksum"):
        _fetch_zip(archive.as_uri(), {"d/items.csv": sha(b"something else")}, tmp_path)


@pytest.fixture
def fetched_custom(llamarec_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The custom dataset obtainable from a fake source; returns its raw cache directory."""

    def fetch(dest: Path) -> None:
        (dest / "interactions.csv").write_text(INTERACTIONS, encoding="utf-8")
        (dest / "items.csv").write_text(ITEMS, encoding="utf-8")

    spec = dataclasses.replace(get_spec("custom"), sources=(Source("fake mirror", fetch),))
    monkeypatch.setitem(DATASETS, "custom", spec)
    return llamarec_cache / "raw" / "custom"


def test_cached_raw_files_are_recorded_and_verified(fetched_custom: Path, llamarec_cache: Path) -> None:
    ds = load_dataset("custom", min_uc=3, min_sc=1)
    assert records(llamarec_cache) == {
        "raw/custom/interactions.csv": sha(INTERACTIONS.encode()),
        "raw/custom/items.csv": sha(ITEMS.encode()),
    }
    assert load_dataset("custom", min_uc=3, min_sc=1).titles == ds.titles  # verified, unchanged
    (fetched_custom / "items.csv").write_text(ITEMS.replace("B", "Evil"), encoding="utf-8")
    with pytest.raises(LlamarecError) as info:
        load_dataset("custom", min_uc=3, min_sc=1)
    msg = str(info.value)
    assert msg.startswith(f"{fetched_custom / 'items.csv'}: sha256 ")
    assert "delete a cached copy to fetch it again" in msg and "\n" not in msg
    # deleting the cached copy fetches it again, and the fresh copy matches the record
    for path in fetched_custom.iterdir():
        path.unlink()
    fetched_custom.rmdir()
    assert locate(get_spec("custom"), None)[0] == fetched_custom


def test_files_put_into_the_cache_by_hand_are_recorded_on_first_read(llamarec_cache: Path) -> None:
    raw = llamarec_cache / "raw" / "custom"
    raw.mkdir(parents=True)
    (raw / "interactions.csv").write_text(INTERACTIONS, encoding="utf-8")
    (raw / "items.csv").write_text(ITEMS, encoding="utf-8")
    load_dataset("custom", min_uc=3, min_sc=1)
    assert set(records(llamarec_cache)) == {"raw/custom/interactions.csv", "raw/custom/items.csv"}


def test_data_dir_files_are_not_recorded(tmp_path: Path, llamarec_cache: Path) -> None:
    (tmp_path / "interactions.csv").write_text(INTERACTIONS, encoding="utf-8")
    (tmp_path / "items.csv").write_text(ITEMS, encoding="utf-8")
    load_dataset("custom", tmp_path, min_uc=3, min_sc=1)
    (tmp_path / "items.csv").write_text(ITEMS.replace("B", "Bee"), encoding="utf-8")  # the user's to edit
    assert load_dataset("custom", tmp_path, min_uc=3, min_sc=1).titles == ["", "A", "Bee", "C"]
    assert not (llamarec_cache / RECORDED_SHA256).exists()
