"""Reading config files and validating them into pydantic models, with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from llamarec.errors import LlamarecError

M = TypeVar("M", bound=BaseModel)


def read_config_file(path: Path) -> dict:
    """A YAML (or JSON, a subset of YAML) file holding a mapping; an empty file is ``{}``."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise LlamarecError(f"{path}: cannot read config ({' '.join(str(exc).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LlamarecError(f"{path}: expected a mapping of option names to values")
    return data


def validate(model_cls: type[M], values: dict, source: str) -> M:
    """``model_cls(**values)``, a validation error becoming one line naming the field."""
    try:
        return model_cls.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "config"
        raise LlamarecError(f"{source}: {field}: {err['msg']} (got {err.get('input')!r})") from None


def read_json_file(path: Path) -> dict:
    """A JSON object a run wrote; a damaged or edited file (truncated, not UTF-8, not an
    object) gives one line naming the file and what is wrong."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LlamarecError(f"{path}: cannot read ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(values, dict):
        raise LlamarecError(f"{path}: expected a JSON object")
    return values


def read_json_config(model_cls: type[M], path: Path) -> M:
    """A JSON file a run wrote, validated into ``model_cls``; a damaged or edited file gives one
    line naming the file and what is wrong."""
    return validate(model_cls, read_json_file(path), str(path))
