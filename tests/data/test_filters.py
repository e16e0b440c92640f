"""No silent data loss: ids compared in canonical form, and every filter's drops reported
(in the statistics, and as a warning above DROP_WARN_SHARE)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llamarec.cli import app
from llamarec.data import load_dataset
from llamarec.data.custom import read_custom
from llamarec.data.ids import canonical_id
from llamarec.data.preprocess import DROP_WARN_SHARE
from llamarec.errors import LlamarecError

N_USERS, N_ITEMS = 6, 8


def write(root: Path, interactions: list[str], items: list[str], order: str = "timestamp") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "interactions.csv").write_text(
        "\n".join([f"user_id,item_id,{order}", *interactions]) + "\n", encoding="utf-8")
    (root / "items.csv").write_text("\n".join(["item_id,title", *items]) + "\n", encoding="utf-8")
    return root


def every_user_every_item(spell: Callable[[int, int], str] = lambda u, i: str(i)) -> list[str]:
    """User u rates items 1..N_ITEMS at times 1..N_ITEMS; ``spell(u, i)`` writes the item id."""
    return [f"{u},{spell(u, i)},{i}" for u in range(1, N_USERS + 1) for i in range(1, N_ITEMS + 1)]


TITLES = [f"{i},Item {i}" for i in range(1, N_ITEMS + 1)]


@pytest.mark.parametrize(("raw", "canonical"), [
    ("7", "7"), ("07", "7"), ("007", "7"), ("7.0", "7"), ("7.", "7"), ("07.000", "7"),
    (" 7 ", "7"), ("+7", "7"), ("-7", "-7"), ("-07.0", "-7"), ("0", "0"), ("00", "0"),
    ("-0", "0"), ("0.0", "0"),
    ("1" * 5000, "1" * 5000),  # no int() conversion limit, no float rounding
    ("0" + "9" * 30, "9" * 30),
    # not integers: kept as written, only stripped
    ("7.5", "7.5"), ("1e3", "1e3"), ("0x1F", "0x1F"), ("B00004TMFE", "B00004TMFE"),
    (" u 7 ", "u 7"), ("7a", "7a"), ("٣", "٣"), ("inf", "inf"),
])
def test_canonical_id(raw: str, canonical: str) -> None:
    assert canonical_id(raw) == canonical
    assert canonical_id(canonical) == canonical


def test_ids_spelled_differently_in_the_two_files_are_one_item(tmp_path: Path) -> None:
    # half the users write 07 / 7.0 / " 7 ", items.csv writes 7: nothing may be lost
    spellings = [lambda i: f"0{i}", lambda i: f"{i}.0", lambda i: f" {i} "]
    inter = every_user_every_item(lambda u, i: spellings[u % 3](i) if u % 2 else str(i))
    root = write(tmp_path / "c", inter, TITLES)
    ds = load_dataset("custom", root, min_uc=3, min_sc=3)
    stats = ds.stats()
    assert (stats["users"], stats["items"], stats["interactions"]) == (N_USERS, N_ITEMS, N_USERS * N_ITEMS)
    assert stats["dropped_interactions_unknown_item"] == 0
    assert ds.item_raw_ids == ["", *map(str, range(1, N_ITEMS + 1))]
    assert all(s.tolist() == list(range(1, N_ITEMS + 1)) for s in ds.sequences)


def test_items_keep_the_spelling_of_items_csv(tmp_path: Path) -> None:
    # items.csv spells the ids with leading zeros (ISBN-like); interactions.csv without
    items = [f"0{i},Item {i}" for i in range(1, N_ITEMS + 1)]
    root = write(tmp_path / "c", every_user_every_item(lambda u, i: str(i)), items)
    ds = load_dataset("custom", root, min_uc=3, min_sc=3)
    assert ds.item_raw_ids == ["", *(f"0{i}" for i in range(1, N_ITEMS + 1))]
    assert ds.n_items == N_ITEMS and ds.stats()["interactions"] == N_USERS * N_ITEMS


def test_user_ids_are_canonical_too(tmp_path: Path) -> None:
    inter = [f"{'07' if i % 2 else '7.0'},a{i},{i}" for i in range(5)]
    root = write(tmp_path / "c", inter, [f"a{i},A{i}" for i in range(5)])
    raw = read_custom(root)
    assert raw.interactions["user"].unique().tolist() == ["7"]


def test_same_item_spelled_twice_in_items_csv_is_an_error(tmp_path: Path) -> None:
    root = write(tmp_path / "c", ["u,7,1"], ["07,Seven", "8,Eight", "7.0,Seven again"])
    with pytest.raises(LlamarecError) as info:
        read_custom(root)
    msg = str(info.value)
    assert msg == (f"{root / 'items.csv'} lines 2 and 4: item_id values '07' and '7.0' are the "
                   "same id ('7'); expected each item_id once")


def test_same_interaction_spelled_twice_is_a_duplicate(tmp_path: Path) -> None:
    root = write(tmp_path / "c", ["u,7,1", "u,07,1"], ["7,Seven"])
    with pytest.raises(LlamarecError, match=r"lines 2 and 3: duplicate interaction \(user_id='u', "
                                            r"item_id='7', time=1\.0\)"):
        read_custom(root)


def test_every_filter_reports_what_it_dropped(tmp_path: Path) -> None:
    # items 1..8 are rated by all 6 users; item 9 is listed without a title (2 ratings), item 10
    # is not listed at all (3 ratings); user 7 has only 2 ratings and fails the 3-core
    inter = every_user_every_item() + ["1,9,20", "2,9,20", "1,10,21", "2,10,21", "3,10,21",
                                       "7,1,1", "7,2,2"]
    root = write(tmp_path / "c", inter, [*TITLES, "9,", "11,"])
    ds = load_dataset("custom", root, min_uc=3, min_sc=3)
    assert ds.params["filters"] == {
        "raw_users": 7, "raw_interactions": 48 + 7,
        "dropped_untitled_items": 2,  # 9 and 11 (never rated) are listed without a title
        "dropped_interactions_untitled_item": 2, "dropped_interactions_unknown_item": 3,
        "dropped_kcore_users": 1, "dropped_kcore_items": 0, "dropped_kcore_interactions": 2,
    }
    stats = ds.stats()
    assert stats["interactions"] == 48
    assert {k: stats[k] for k in ds.params["filters"]} == ds.params["filters"]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_losing_more_than_the_share_warns_once_per_filter(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    # items.csv covers only items 1..4: half the interactions have no title
    root = write(tmp_path / "c", every_user_every_item(), TITLES[:4])
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("custom", root, min_uc=3, min_sc=3)
    assert ds.stats()["dropped_interactions_unknown_item"] == 24
    [line] = warnings_of(caplog)
    assert line.startswith(f"warning: {root}: 24 of 48 interactions (50.0%) dropped for lack of an "
                           "item title: 24 whose item id is not in the items file, 0 whose item")
    assert "\n" not in line
    # the k-core gets its own line: 5 of 6 users have too few interactions for min_uc=8
    caplog.clear()
    inter = [row for row in every_user_every_item() if row.startswith("1,") or int(row.split(",")[1]) <= 4]
    root = write(tmp_path / "d", inter, TITLES)
    with caplog.at_level(logging.WARNING):
        load_dataset("custom", root, min_uc=8, min_sc=1)
    [line] = warnings_of(caplog)
    assert line == f"warning: {root}: 8/1-core filtering dropped 20 of 28 interactions (71.4%), 5 users and 0 items"


def test_small_losses_do_not_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert DROP_WARN_SHARE == 0.10
    # 4 of 48 + 4 = 7.7 % of the interactions name an unknown item: reported, not warned about
    root = write(tmp_path / "c", every_user_every_item() + [f"{u},99,50" for u in range(1, 5)], TITLES)
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("custom", root, min_uc=3, min_sc=3)
    assert ds.stats()["dropped_interactions_unknown_item"] == 4
    assert warnings_of(caplog) == []


def test_nothing_left_names_what_each_filter_dropped(tmp_path: Path) -> None:
    root = write(tmp_path / "c", every_user_every_item(lambda u, i: f"x{i}"), TITLES)
    with pytest.raises(LlamarecError, match=r"no interactions left after dropping untitled items and "
                       r"3/3-core filtering \(of 48: 48 with an item id not in the items file, 0 with "
                       r"an untitled item, 0 by the k-core\)"):
        load_dataset("custom", root, min_uc=3, min_sc=3)


def test_prepare_json_prints_the_drops(tmp_path: Path) -> None:
    root = write(tmp_path / "c", every_user_every_item(), TITLES[:4])
    args = ["data", "prepare", "-d", "custom", "--data-dir", str(root), "--min-uc", "3",
            "--min-sc", "3", "--json"]
    for _ in range(2):  # prepared, then read from the cache: the same report
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        out = json.loads(result.stdout)
        assert out["raw_interactions"] == 48 and out["dropped_interactions_unknown_item"] == 24
        assert out["interactions"] == 24


def test_script_warning_is_one_line_on_stderr(tmp_path: Path, run_llamarec) -> None:
    root = write(tmp_path / "c", every_user_every_item(), TITLES[:4])
    proc = run_llamarec("data", "prepare", "-d", "custom", "--data-dir", str(root),
                        "--min-uc", "3", "--min-sc", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["dropped_interactions_unknown_item"] == 24
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"warning: {root}: 24 of 48 interactions (50.0%) dropped")
