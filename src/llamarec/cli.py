"""The ``llamarec`` command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from llamarec.errors import LlamarecError

app = typer.Typer(help="LLM-based two-stage recommendation: retrieve with a sequential model, "
                       "rank with an LLM.", no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Datasets: list them, prepare and cache them.", no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console()

DatasetOpt = Annotated[str, typer.Option("--dataset", "-d", help="Dataset name (see `llamarec data list`).")]
DataDirOpt = Annotated[Path | None, typer.Option(
    "--data-dir", help="Directory holding the dataset's raw files (else cache, download, mirror).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def print_mapping(title: str, values: dict, as_json: bool) -> None:
    """Print a flat mapping as a two-column table, or as JSON."""
    if as_json:
        print(json.dumps(values, indent=2))
        return
    table = Table(title=title, show_header=False)
    for key, value in values.items():
        table.add_row(str(key), f"{value:,}" if isinstance(value, int) else str(value))
    console.print(table)


@data_app.command("list")
def data_list() -> None:
    """List the known datasets with their descriptions and licences."""
    from llamarec.data import DATASETS

    table = Table("name", "description", "licence")
    for spec in DATASETS.values():
        table.add_row(spec.name, spec.description, spec.license)
    console.print(table)


@data_app.command("prepare")
def data_prepare(
    dataset: DatasetOpt,
    data_dir: DataDirOpt = None,
    min_uc: Annotated[int, typer.Option(help="Minimum interactions per user (iterative k-core).")] = 5,
    min_sc: Annotated[int, typer.Option(help="Minimum interactions per item (iterative k-core).")] = 5,
    as_json: JsonOpt = False,
) -> None:
    """Prepare a dataset (titles, k-core, chronological order), cache it and print its statistics."""
    from llamarec.data import load_dataset

    ds = load_dataset(dataset, data_dir, min_uc=min_uc, min_sc=min_sc)
    print_mapping(f"{dataset}", ds.stats(), as_json)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 1
    (set LLAMAREC_DEBUG=1 for the traceback)."""
    try:
        app()
    except LlamarecError as exc:
        if os.environ.get("LLAMAREC_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
