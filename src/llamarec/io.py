"""Atomic writes for every artifact llamarec saves.

A file is written next to its destination under a temporary name and moved into place with
``os.replace``, so an interrupted run leaves either the old file or the new one, never half
of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llamarec.errors import LlamarecError


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces ``dest`` atomically, on error it is removed."""
    dest = Path(dest)
    with _writing(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _writing(dest):
            yield tmp_path
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; use the usual mode
            os.replace(tmp_path, dest)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``dest`` (a directory) when the block succeeds."""
    dest = Path(dest)
    with _writing(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        with _writing(dest):
            try:
                yield tmp
            except LlamarecError as exc:  # a file written inside: name it by where it was going
                raise LlamarecError(str(exc).replace(str(tmp), str(dest))) from None
            if dest.exists():
                old = dest.with_name(f".{dest.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(dest, old)
                os.replace(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _writing(dest: Path) -> Iterator[None]:
    """An OS error while writing ``dest`` (a read-only directory, a full disk, a file-size
    limit) becomes one line naming it; the previous ``dest``, if any, is left as it was."""
    try:
        yield
    except OSError as exc:
        raise LlamarecError(f"{dest}: cannot write ({exc.strerror or exc}); the previous version, "
                            "if any, is unchanged") from None
    except Exception as exc:
        # Libraries written in Rust (safetensors, tokenizers) raise their own types for I/O
        # errors, naming the OS error: "... I/O error: File too large (os error 27)".
        found = re.search(r"([^:]+?) \(os error \d+\)", str(exc))
        if found:
            raise LlamarecError(f"{dest}: cannot write ({found.group(1).strip()}); the previous version, if any, "
                                "is unchanged") from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(dest: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_text(dest: str | os.PathLike[str], text: str) -> None:
    """Write text, atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")
