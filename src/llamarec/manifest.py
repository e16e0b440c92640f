"""``manifest.json``: the sha256 and size of every artifact a run writes, one per directory.

A writer calls :func:`record` right after the atomic write of an artifact (a file, or a
directory whose files are all recorded); a loader calls :func:`verify` before reading one, so
that a changed or damaged file stops the load with one line naming it instead of giving wrong
or NaN results. A directory without a manifest (a run from before manifests) and a file the
manifest does not list are not checked. The manifest itself is replaced atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

from llamarec.errors import LlamarecError
from llamarec.fetch import sha256_of
from llamarec.io import write_json
from llamarec.layout import MANIFEST_FILE

FORMAT = 1


def _read(directory: Path) -> dict[str, dict] | None:
    """The manifest's entries (relative path -> sha256 and size), None without a manifest."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return None
    hint = "restore it, or delete it to load the run unverified"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LlamarecError(f"{path}: cannot read ({' '.join(str(exc).split())[:160]}); {hint}") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("size"), int)
            for e in files.values()):
        raise LlamarecError(f"{path}: not a manifest (expected files: {{path: {{sha256, size}}}}); {hint}")
    return files


def _listed_files(root: Path) -> list[Path]:
    """Files under ``root``, without manifests and hidden (temporary) files."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_FILE
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _relative(directory: Path, path: Path) -> str:
    rel = path.relative_to(directory).as_posix()
    return "" if rel == "." else rel


def _under(key: str, rel: str) -> bool:
    return not rel or key == rel or key.startswith(rel + "/")


def record(directory: str | Path, path: str | Path) -> None:
    """List ``path`` (a file in ``directory``, or a directory whose files are all listed,
    replacing what was listed under it) in ``directory/manifest.json``."""
    directory, path = Path(directory), Path(path)
    files = dict(_read(directory) or {})
    rel = _relative(directory, path)
    if path.is_dir():
        files = {k: v for k, v in files.items() if not _under(k, rel)}
        found = _listed_files(path)
    else:
        found = [path]
    for file in found:
        files[_relative(directory, file)] = {"sha256": sha256_of(file), "size": file.stat().st_size}
    write_json(directory / MANIFEST_FILE, {"format": FORMAT, "files": dict(sorted(files.items()))})


def forget(directory: str | Path, path: str | Path) -> None:
    """Drop ``path`` (a file, or everything under a directory) from the manifest, for a writer
    that removes it to make it afresh."""
    directory, path = Path(directory), Path(path)
    files = _read(directory)
    rel = _relative(directory, path)
    if files is not None and any(_under(k, rel) for k in files):
        write_json(directory / MANIFEST_FILE, {"format": FORMAT, "files": {
            k: v for k, v in files.items() if not _under(k, rel)}})


def verify(directory: str | Path, *names: str) -> None:
    """Check ``names`` (files or directories relative to ``directory``) against the manifest:
    every file it lists under them must exist with its sha256 and size."""
    directory = Path(directory)
    files = _read(directory)
    if files is None:
        return
    for name in names:
        rel = _relative(directory, directory / name)
        for key in sorted(k for k in files if _under(k, rel)):
            path = directory / key
            if not path.is_file():
                raise LlamarecError(f"{path}: missing, though {MANIFEST_FILE} lists it (deleted? "
                                    "retrain or restore it)")
            entry = files[key]
            if path.stat().st_size != entry["size"]:
                what = "size"
            elif sha256_of(path) != entry["sha256"]:
                what = "sha256"
            else:
                continue
            raise LlamarecError(f"{path}: {what} mismatch with {MANIFEST_FILE} (the file was changed or damaged; "
                                "retrain or restore it)")
