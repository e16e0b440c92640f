"""Fuzzing custom datasets (issue 14): generated interactions.csv / items.csv files — encodings,
missing, extra, reordered and duplicated columns, NaN/inf and odd timestamps, huge and
mixed-format ids, empty and invisible titles, one-row users, quoting, truncation and stray
bytes — must each end in a valid dataset or a one-line :class:`LlamarecError`, never another
exception, and a failed case leaves the processed cache as it was.

The slow test runs 1,000 derandomised cases (the same ones on every machine); the quick one 60.
"""

from __future__ import annotations

import csv
import hashlib
import io
import shutil
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_helpers import tally

from llamarec.data import load_dataset, processed_dir
from llamarec.data.ids import canonical_id
from llamarec.errors import LlamarecError

# --------------------------------------------------------------------------- ids and values
HUGE = "98765432109876543210987654321098765432"


def spellings(n: int) -> list[str]:
    """Ways a spreadsheet or a data-frame export writes the integer id ``n``."""
    return [str(n), f"0{n}", f"{n}.0", f" {n} ", f"+{n}", f"{n}.00"]


@st.composite
def item_ids(draw, n: int) -> list[str]:
    """``n`` distinct item ids (as items.csv spells them) of one of several kinds."""
    kind = draw(st.sampled_from(["small", "huge", "alnum", "mixed", "unicode", "negative", "float"]))
    if kind == "small":
        return [str(i + 1) for i in range(n)]
    if kind == "huge":
        return [f"{HUGE}{i}" for i in range(n)]
    if kind == "alnum":
        return [f"B{i:08d}X" for i in range(n)]
    if kind == "negative":
        return [str(-i) for i in range(n)]
    if kind == "float":
        return [f"{i}.5" for i in range(n)]
    if kind == "unicode":
        return [f"ü{i}" if i % 2 else f"Ⅸ{i}" for i in range(n)]  # Ⅸ: NFKC would make it IX
    return [str(i + 1) if i % 3 == 0 else f"sku-{i}" if i % 3 == 1 else f"{HUGE}{i}" for i in range(n)]


ODD_IDS = ["", " ", "\x00", "a\x00b", "nan", "NaN", "inf", "None", "null", '"', "a,b", "a\nb", "\u200b", "\u202e7"]
ODD_TIMES = ["nan", "NaN", "inf", "-inf", "", "1e308", "1e400", "-5", "12.5", "yesterday", "0x10", "1_000", " 7 "]
INVISIBLE_TITLES = ["\u200b", "\u200b\u200c", "\u202e", " \t ", "\ufeff", "\u2800", "\u3164"]
ODD_TITLES = ["", "unknown", "Item &amp; Co", "A, \"quoted\" title", "line\nbreak", "\u202eexe.gnp",
              "Ｆｕｌｌ ｗｉｄｔｈ", "x" * 2000, "(B) ### Candidate pool:", "Émile", "日本語のタイトル", "\x00nul"]


# Faults a case may carry (none in about half the cases); everything else varies in every case:
# id kinds and spellings (07, 7.0, +7), extra and reordered columns, one-row users, items the
# items file lacks or leaves untitled, odd but visible titles, quoting, line endings, a BOM.
FAULTS = ["odd time", "odd id", "missing column", "duplicated column", "renamed column", "both orders",
          "invisible title", "duplicated item", "items columns", "encoding", "truncated", "stray byte", "empty file"]


@st.composite
def dataset_case(draw) -> dict:
    faults = set(draw(st.one_of(st.just([]), st.lists(st.sampled_from(FAULTS), min_size=1, max_size=2))))
    n_items = draw(st.integers(1, 12))
    ids = draw(item_ids(n_items))
    canon = [canonical_id(i) for i in ids]
    n_users = draw(st.integers(1, 8))
    users = draw(st.sampled_from([[f"u{u}" for u in range(n_users)], [str(u) for u in range(n_users)],
                                  [f"0{u}" for u in range(n_users)], [f"{HUGE}{u}" for u in range(n_users)]]))
    order = draw(st.sampled_from(["timestamp", "position"]))
    rows = []
    for user in users:
        length = draw(st.integers(1, 7))  # one-row users included
        picks = draw(st.lists(st.integers(0, n_items - 1), min_size=length, max_size=length))
        for position, item in enumerate(picks):
            spelled = ids[item]
            if spelled.lstrip("+-").isdigit() and draw(st.integers(0, 4)) == 0:
                spelled = draw(st.sampled_from(spellings(int(canon[item]))))  # 07, 7.0, +7 ...
            time = position if order == "position" else 1_600_000_000 + 60 * position
            rows.append([user, spelled, str(time)])
    for fault, values, column in (("odd time", ODD_TIMES, 2), ("odd id", ODD_IDS, draw(st.integers(0, 1)))):
        if fault in faults:
            for _ in range(draw(st.integers(1, 2))):
                rows[draw(st.integers(0, len(rows) - 1))][column] = draw(st.sampled_from(values))
    columns = ["user_id", "item_id", order]
    if draw(st.booleans()):  # an extra column (ignored)
        columns.append("rating")
        rows = [r + [draw(st.sampled_from(["5", "", "nan", "x"]))] for r in rows]
    if draw(st.booleans()):  # columns in another order
        perm = draw(st.permutations(range(len(columns))))
        columns, rows = [columns[i] for i in perm], [[r[i] for i in perm] for r in rows]
    if "missing column" in faults:
        drop = draw(st.integers(0, len(columns) - 1))
        columns, rows = columns[:drop] + columns[drop + 1:], [r[:drop] + r[drop + 1:] for r in rows]
    if "duplicated column" in faults:
        dup = draw(st.integers(0, len(columns) - 1))
        columns, rows = [*columns, columns[dup]], [[*r, r[dup]] for r in rows]
    if "renamed column" in faults:
        columns[0] = draw(st.sampled_from(["User_ID", "user", " user_id ", "\ufeffuser_id", "user id"]))
    if "both orders" in faults:
        columns.append("position" if order == "timestamp" else "timestamp")
        rows = [[*r, str(k)] for k, r in enumerate(rows)]

    item_rows = []
    for item, spelled in enumerate(ids):
        roll = draw(st.integers(0, 11))
        if roll == 0:
            continue  # an item the items file does not know (its interactions are dropped)
        title = f"Item {item}"
        if roll == 1:
            title = draw(st.sampled_from(ODD_TITLES))
        elif roll == 2 and spelled.isdigit():
            spelled = draw(st.sampled_from(spellings(int(spelled))))
        item_rows.append([spelled, title])
    if "invisible title" in faults and item_rows:
        item_rows[draw(st.integers(0, len(item_rows) - 1))][1] = draw(st.sampled_from(INVISIBLE_TITLES))
    if "duplicated item" in faults and item_rows:
        row = list(item_rows[draw(st.integers(0, len(item_rows) - 1))])
        if row[0].isdigit() and draw(st.booleans()):
            row[0] = f"0{row[0]}"  # the same id spelled differently
        item_rows.append(row)
    item_columns = ["item_id", "title"]
    if "items columns" in faults:
        item_columns = draw(st.sampled_from([["item_id"], ["item_id", "title", "title"], ["item_id", "name"]]))
        item_rows = [(r + [""])[: len(item_columns)] for r in item_rows]
    damaged = draw(st.sampled_from(["interactions", "items"]))
    return {
        "interactions": render(draw, columns, rows, faults if damaged == "interactions" else set()),
        "items": render(draw, item_columns, item_rows, faults if damaged == "items" else set()),
        "min_uc": 3,
        "min_sc": draw(st.sampled_from([1, 1, 2])),
        "faults": sorted(faults),
    }


def render(draw, columns: list[str], rows: list[list[str]], faults: set[str]) -> bytes:
    """CSV bytes in a drawn quoting style and line ending (UTF-8, maybe with a BOM), or with
    the damage of ``faults``."""
    buffer = io.StringIO()
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]))
    writer = csv.writer(buffer, quoting=quoting, lineterminator=draw(st.sampled_from(["\n", "\r\n"])))
    writer.writerow(columns)
    writer.writerows(rows)
    text = buffer.getvalue()
    if draw(st.integers(0, 9)) == 0:
        text = "\n\n" + text + "\n \n"  # blank lines around the table
    encoding = draw(st.sampled_from(["latin-1", "utf-16", "cp1252"])) if "encoding" in faults else \
        draw(st.sampled_from(["utf-8", "utf-8", "utf-8-sig"]))
    data = text.encode(encoding, errors="replace")
    if "truncated" in faults and len(data) > 2:
        data = data[: draw(st.integers(1, len(data) - 1))]  # cut mid-row
    if "stray byte" in faults:
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from([b"\xff", b"\x00", b"\xc3", b'"', b",", b"\r"])) + data[at:]
    if "empty file" in faults:
        data = draw(st.sampled_from([b"", b"\n\n", b"\xef\xbb\xbf"]))
    return data


# --------------------------------------------------------------------------- the checks
def snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def check_valid(ds, case_dir: Path) -> None:
    """What every prepared dataset must satisfy."""
    assert ds.n_users >= 1 and ds.n_items >= 1
    assert len(ds.user_raw_ids) == ds.n_users == len(set(ds.user_raw_ids))
    assert len(ds.item_raw_ids) == len(ds.titles) == ds.n_items + 1
    assert len(set(ds.item_raw_ids[1:])) == ds.n_items
    seen = set()
    for seq in ds.sequences:
        assert len(seq) >= 3  # min_uc
        assert seq.min() >= 1 and seq.max() <= ds.n_items
        seen.update(seq.tolist())
    assert seen == set(range(1, ds.n_items + 1))  # every item is used
    for title in ds.titles[1:]:
        assert isinstance(title, str) and title == title.strip()
        assert not any(unicodedata.category(c) in ("Cc", "Cf") for c in title), title
    stats = ds.stats()
    assert stats["interactions"] == sum(len(s) for s in ds.sequences)
    assert stats["raw_interactions"] >= stats["interactions"]


def run_case(case: dict, work: Path, seed_entry: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Prepare one generated dataset; returns ``valid`` or ``error``."""
    shutil.rmtree(work, ignore_errors=True)
    data, cache = work / "data", work / "cache"
    data.mkdir(parents=True)
    (data / "interactions.csv").write_bytes(case["interactions"])
    (data / "items.csv").write_bytes(case["items"])
    shutil.copytree(seed_entry, cache / "processed" / seed_entry.name)  # an entry that must survive
    monkeypatch.setenv("LLAMAREC_CACHE", str(cache))
    before = snapshot(cache)
    try:
        ds = load_dataset("custom", data, min_uc=case["min_uc"], min_sc=case["min_sc"])
    except LlamarecError as exc:
        message = str(exc)
        assert message and "\n" not in message and "\r" not in message, repr(message)
        assert snapshot(cache) == before, "a failed case changed the cache"
        return "error"
    check_valid(ds, data)
    after = snapshot(cache)
    assert {k: v for k, v in after.items() if k in before} == before  # the other entry is untouched
    entry, _ = processed_dir("custom", data, min_uc=case["min_uc"], min_sc=case["min_sc"])
    assert (entry / "meta.json").is_file()
    again = load_dataset("custom", data, min_uc=case["min_uc"], min_sc=case["min_sc"])  # from the cache
    assert [s.tolist() for s in again.sequences] == [s.tolist() for s in ds.sequences]
    assert again.titles == ds.titles and again.item_raw_ids == ds.item_raw_ids
    return "valid"


@pytest.fixture
def seed_entry(tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A processed cache entry (of the tiny world) that every case's cache starts with."""
    monkeypatch.setenv("LLAMAREC_CACHE", str(tmp_path / "seed"))
    load_dataset("custom", tiny_data_dir)
    entry, _ = processed_dir("custom", tiny_data_dir)
    return entry


def fuzz(n: int, tmp_path: Path, seed_entry: Path, monkeypatch: pytest.MonkeyPatch) -> Counter:
    counts: Counter = Counter()

    @settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.filter_too_much])
    @given(case=dataset_case())
    def check(case: dict) -> None:
        counts[run_case(case, tmp_path / "case", seed_entry, monkeypatch)] += 1

    check()
    return counts


def report(counts: Counter, what: str) -> None:
    total = sum(counts.values())
    print(f"fuzzed {total} custom datasets: {counts['valid']} valid, {counts['error']} one-line errors, "
          "0 other exceptions, 0 cache changes on error")
    tally(what, "valid dataset", counts["valid"])
    tally(what, "one-line error", counts["error"])


def test_fuzz_custom_datasets_quick(tmp_path: Path, seed_entry: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counts = fuzz(60, tmp_path, seed_entry, monkeypatch)
    report(counts, "fuzz (quick): custom datasets")
    assert sum(counts.values()) >= 60


@pytest.mark.slow
def test_fuzz_custom_datasets(tmp_path: Path, seed_entry: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counts = fuzz(1000, tmp_path, seed_entry, monkeypatch)
    report(counts, "fuzz: custom datasets")
    assert sum(counts.values()) >= 1000
    assert counts["valid"] >= 100 and counts["error"] >= 100  # both outcomes are exercised
