"""The paper's preprocessing, the processed dataset's on-disk form and cache, and the split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import llamarec.data as data_pkg
from llamarec.data import load_dataset, processed_dir
from llamarec.data.dataset import Dataset
from llamarec.data.preprocess import k_core, preprocess
from llamarec.data.split import eval_examples, history_and_target, pad_left, train_sequence
from llamarec.data.tables import RawData
from llamarec.errors import LlamarecError


def raw_data(rows: list[tuple[str, str, float]], titles: dict[str, str], source: str = "src") -> RawData:
    inter = pd.DataFrame(rows, columns=["user", "item", "time"])
    items = pd.DataFrame({"item": list(titles), "title": list(titles.values())})
    return RawData(inter, items, source)


def seqs(ds: Dataset) -> list[list[int]]:
    return [s.tolist() for s in ds.sequences]


def assert_same(a: Dataset, b: Dataset) -> None:
    assert a.name == b.name
    assert seqs(a) == seqs(b)
    assert all(s.dtype == np.int64 for s in a.sequences + b.sequences)
    assert a.titles == b.titles
    assert a.item_raw_ids == b.item_raw_ids
    assert a.user_raw_ids == b.user_raw_ids
    assert a.params == b.params


# --------------------------------------------------------------------------- k-core

# A chain that one simultaneous pass does not settle (bounds 2/2): item a has one user, so a
# goes; then u1 holds only b and goes; then b holds only u2 ... until u4 leaves x with exactly
# the two users u5 and u6.
CHAIN = [("u1", "a"), ("u1", "b"), ("u2", "b"), ("u2", "c"), ("u3", "c"), ("u3", "d"),
         ("u4", "d"), ("u4", "x"), ("u5", "x"), ("u5", "y"), ("u6", "x"), ("u6", "y")]


def test_k_core_is_iterative() -> None:
    inter = pd.DataFrame(CHAIN, columns=["user", "item"]).assign(time=0.0)
    # a single pass removes only item a, which is not yet a 2-core
    one_pass = inter[inter["item"].map(inter["item"].value_counts()) >= 2]
    assert len(one_pass) == len(inter) - 1
    assert one_pass["user"].value_counts().min() == 1
    core = k_core(inter, min_uc=2, min_sc=2)
    assert sorted(map(tuple, core[["user", "item"]].values.tolist())) == [
        ("u5", "x"), ("u5", "y"), ("u6", "x"), ("u6", "y")]


def test_k_core_order_independent_and_keeps_stable_input() -> None:
    inter = pd.DataFrame(CHAIN, columns=["user", "item"]).assign(time=0.0)
    for seed in range(3):
        shuffled = inter.sample(frac=1.0, random_state=seed)
        core = k_core(shuffled, min_uc=2, min_sc=2)
        assert sorted(core["user"] + core["item"]) == ["u5x", "u5y", "u6x", "u6y"]
    stable = inter[inter["user"].isin(["u5", "u6"])]
    assert k_core(stable, 2, 2).equals(stable)
    # bounds of 1 keep everything; bounds above every count empty it
    assert len(k_core(inter, 1, 1)) == len(inter)
    assert k_core(inter, 3, 3).empty


def test_k_core_user_bound_cascades_to_items() -> None:
    # users need 3 items, items need 2 users: u3 (2 items) and d (1 user) go, the rest holds
    rows = [("u1", "a"), ("u1", "b"), ("u1", "c"), ("u2", "a"), ("u2", "b"), ("u2", "c"),
            ("u3", "c"), ("u3", "d")]
    inter = pd.DataFrame(rows, columns=["user", "item"]).assign(time=0.0)
    assert k_core(inter, 3, 2)["user"].tolist() == ["u1", "u1", "u1", "u2", "u2", "u2"]
    # without (u2, c) only u1 keeps 3 items; then a, b and c have one user each and go, which
    # leaves u1 with nothing: the whole set is removed, but only on the second pass
    rows.remove(("u2", "c"))
    assert k_core(pd.DataFrame(rows, columns=["user", "item"]).assign(time=0.0), 3, 2).empty


def test_preprocess_uses_iterative_k_core() -> None:
    rows = [(u, i, float(n)) for n, (u, i) in enumerate(CHAIN)]
    # with min_uc=3 nobody in CHAIN survives; add a third item to u5 and u6 and a third user
    rows += [("u5", "z", 100.0), ("u6", "z", 101.0), ("u7", "x", 1.0), ("u7", "y", 2.0),
             ("u7", "z", 3.0), ("u1", "c", 9.0)]
    titles = {i: i.upper() for i in "abcdxyz"}
    ds = preprocess(raw_data(rows, titles), "t", min_uc=3, min_sc=3)
    assert ds.user_raw_ids == ["u5", "u6", "u7"]
    assert ds.item_raw_ids == ["", "x", "y", "z"]
    assert ds.titles == ["", "X", "Y", "Z"]
    assert seqs(ds) == [[1, 2, 3], [1, 2, 3], [1, 2, 3]]
    assert ds.params == {"min_uc": 3, "min_sc": 3, "filters": {
        "raw_users": 7, "raw_interactions": 18, "dropped_untitled_items": 0,
        "dropped_interactions_untitled_item": 0, "dropped_interactions_unknown_item": 0,
        "dropped_kcore_users": 4, "dropped_kcore_items": 4, "dropped_kcore_interactions": 9}}


# --------------------------------------------------------------------------- ids and order

ROWS = [
    ("10", "2", 5.0), ("10", "10", 3.0), ("10", "1", 4.0),
    ("9", "10", 1.0), ("9", "9", 1.0), ("9", "2", 1.0), ("9", "1", 0.5),
    ("100", "1", 7.0), ("100", "2", 6.0), ("100", "9", 8.0),
]
TITLES = {"1": "One", "2": "Two", "9": "Nine", "10": "Ten"}
NOTHING_DROPPED = {"raw_users": 3, "raw_interactions": 10, "dropped_untitled_items": 0,
                   "dropped_interactions_untitled_item": 0, "dropped_interactions_unknown_item": 0,
                   "dropped_kcore_users": 0, "dropped_kcore_items": 0, "dropped_kcore_interactions": 0}


def test_dense_ids_follow_numeric_raw_order() -> None:
    ds = preprocess(raw_data(ROWS, TITLES), "n", min_uc=3, min_sc=1)
    # numeric ids sort as numbers, not strings ("9" < "10" < "100")
    assert ds.user_raw_ids == ["9", "10", "100"]
    assert ds.item_raw_ids == ["", "1", "2", "9", "10"]
    assert ds.titles == ["", "One", "Two", "Nine", "Ten"]
    # user 9: 1 at 0.5, then 2, 9 and 10 tie at 1.0 and follow the item order (9 before 10)
    assert seqs(ds) == [[1, 2, 3, 4], [4, 1, 2], [2, 1, 3]]


def test_dense_ids_do_not_depend_on_row_order() -> None:
    base = preprocess(raw_data(ROWS, TITLES), "n", min_uc=3, min_sc=1)
    raw = raw_data(ROWS, TITLES)
    for seed in range(5):
        shuffled = RawData(raw.interactions.sample(frac=1.0, random_state=seed),
                           raw.items.sample(frac=1.0, random_state=seed + 100), "src")
        assert_same(preprocess(shuffled, "n", min_uc=3, min_sc=1), base)


def test_non_numeric_ids_sort_as_strings() -> None:
    rows = [("b", "x2", 1.0), ("b", "10", 2.0), ("b", "x1", 2.0), ("a", "x1", 0.0), ("a", "10", 0.0),
            ("a", "x2", 0.0)]
    ds = preprocess(raw_data(rows, {"x1": "X1", "x2": "X2", "10": "TEN"}), "s", min_uc=3, min_sc=1)
    assert ds.user_raw_ids == ["a", "b"]
    assert ds.item_raw_ids == ["", "10", "x1", "x2"]
    assert seqs(ds) == [[1, 2, 3], [3, 1, 2]]


def test_untitled_items_dropped_before_k_core() -> None:
    # u1 has three items but c has no title: with c dropped first, u1 has 2 < 3 and goes
    rows = [("u1", "a", 1.0), ("u1", "b", 2.0), ("u1", "c", 3.0),
            ("u2", "a", 1.0), ("u2", "b", 2.0), ("u2", "d", 3.0)]
    ds = preprocess(raw_data(rows, {"a": "A", "b": "B", "d": "D"}), "t", min_uc=3, min_sc=1)
    assert ds.user_raw_ids == ["u2"]
    assert ds.item_raw_ids == ["", "a", "b", "d"]
    assert seqs(ds) == [[1, 2, 3]]


def test_duplicate_title_rows_keep_the_first() -> None:
    raw = raw_data([("u", "a", 1.0), ("u", "b", 2.0), ("u", "c", 3.0)], {"a": "A", "b": "B", "c": "C"})
    raw.items = pd.concat([raw.items, pd.DataFrame({"item": ["a"], "title": ["Other"]})])
    assert preprocess(raw, "t", min_uc=3, min_sc=1).titles == ["", "A", "B", "C"]


def test_empty_after_filtering() -> None:
    raw = raw_data([("u", "a", 1.0), ("u", "b", 2.0), ("u", "c", 3.0)], {"a": "A", "b": "B", "c": "C"},
                   source="/some/dir")
    with pytest.raises(LlamarecError, match=r"/some/dir: no interactions left .* 3/2-core"):
        preprocess(raw, "t", min_uc=3, min_sc=2)
    with pytest.raises(LlamarecError, match="no interactions left"):
        preprocess(raw_data([("u", "a", 1.0)], {"z": "Z"}), "t", min_uc=3, min_sc=1)


def test_min_uc_below_three_is_rejected() -> None:
    raw = raw_data([("u", "a", 1.0), ("u", "b", 2.0), ("u", "c", 3.0)], {"a": "A", "b": "B", "c": "C"})
    with pytest.raises(LlamarecError, match="min_uc=2: leave-one-out needs at least 3"):
        preprocess(raw, "t", min_uc=2, min_sc=1)


def test_stats_hand_computed() -> None:
    ds = preprocess(raw_data(ROWS, TITLES), "n", min_uc=3, min_sc=1)
    # lengths 4, 3, 3 over 3 users and 4 items
    assert ds.stats() == {"dataset": "n", "users": 3, "items": 4, "interactions": 10,
                          "mean_seq_len": 3.33, "median_seq_len": 3.0, "density": 0.833333,
                          **NOTHING_DROPPED}
    # a dataset built without preprocessing has no filter report
    ds.params.pop("filters")
    assert list(ds.stats()) == ["dataset", "users", "items", "interactions", "mean_seq_len",
                                "median_seq_len", "density"]


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path: Path) -> None:
    ds = preprocess(raw_data(ROWS, {**TITLES, "9": "Nine: ünïcode & more"}), "n", min_uc=3, min_sc=1)
    ds.params["raw_dir"] = "/x"
    target = tmp_path / "out" / "n"
    ds.save(target)
    assert sorted(p.name for p in target.iterdir()) == [
        "interactions.parquet", "items.parquet", "manifest.json", "meta.json", "users.parquet"]
    for name in ("interactions.parquet", "items.parquet", "users.parquet"):
        assert (target / name).read_bytes()[:4] == b"PAR1"
    meta = json.loads((target / "meta.json").read_text(encoding="utf-8"))
    assert meta == {"format_version": 1, "name": "n", "params": ds.params, "stats": ds.stats()}
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["n"]  # no temp dir left behind
    loaded = Dataset.load(target)
    assert_same(loaded, ds)
    # saving again over an existing copy replaces it
    ds.titles[1] = "Changed"
    ds.save(target)
    assert Dataset.load(target).titles[1] == "Changed"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["n"]


def test_load_rejects_unknown_format_version_and_missing_files(tmp_path: Path) -> None:
    ds = preprocess(raw_data(ROWS, TITLES), "n", min_uc=3, min_sc=1)
    ds.save(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    (tmp_path / "d" / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(LlamarecError, match="meta.json: .*mismatch with manifest.json"):
        Dataset.load(tmp_path / "d")
    (tmp_path / "d" / "manifest.json").unlink()  # a cache entry from before manifests
    with pytest.raises(LlamarecError, match="format_version 99 is not 1"):
        Dataset.load(tmp_path / "d")
    (tmp_path / "d" / "users.parquet").unlink()
    with pytest.raises(LlamarecError, match="not a readable processed dataset"):
        Dataset.load(tmp_path / "d")
    with pytest.raises(LlamarecError, match="not a readable processed dataset"):
        Dataset.load(tmp_path / "missing")


# --------------------------------------------------------------------------- processed cache


# Many users who rate four items in the same second, after one earlier rating.
TIED_ROWS = [(f"u{u}", str(i), 1.0 if i else 0.0) for u in range(30) for i in (0, 1, 2, 3, 4)]
TIED_TITLES = {str(i): f"Item {i}" for i in range(5)}


def test_random_ties_are_a_fixed_order_unrelated_to_the_item_ids() -> None:
    """``ties: random`` orders same-time ratings by a hash of the raw ids: whatever the rows'
    order, always the same sequences; not by item id (which would decide the test item); and
    times still ascend."""
    raw = raw_data(TIED_ROWS, TIED_TITLES)
    by_item = preprocess(raw, "n", min_uc=3, min_sc=1)
    assert seqs(by_item) == [[1, 2, 3, 4, 5]] * 30
    randomly = preprocess(raw, "n", min_uc=3, min_sc=1, ties="random")
    assert randomly.params["ties"] == "random" and "ties" not in by_item.params
    assert all(s[0] == 1 and sorted(s[1:]) == [2, 3, 4, 5] for s in seqs(randomly))  # item "0" came first
    assert len({s[-1] for s in seqs(randomly)}) == 4  # every tied item is some user's test item
    for seed in range(3):
        shuffled = RawData(raw.interactions.sample(frac=1.0, random_state=seed), raw.items, "src")
        assert_same(preprocess(shuffled, "n", min_uc=3, min_sc=1, ties="random"), randomly)
        assert_same(preprocess(shuffled, "n", min_uc=3, min_sc=1), by_item)


def test_unknown_ties_is_one_error() -> None:
    with pytest.raises(LlamarecError, match=r"ties='time': use one of item, random"):
        preprocess(raw_data(ROWS, TITLES), "n", min_uc=3, min_sc=1, ties="time")


def write_custom(root: Path, n_users: int = 4, n_items: int = 5) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = ["user_id,item_id,timestamp"]
    rows += [f"u{u},i{i},{10 * u + (i * 7) % n_items}" for u in range(n_users) for i in range(n_items)]
    (root / "interactions.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    titles = ["item_id,title"] + [f"i{i},Item {i}" for i in range(n_items)]
    (root / "items.csv").write_text("\n".join(titles) + "\n", encoding="utf-8")
    return root


def test_cache_is_keyed_by_params_and_reused(tmp_path: Path, llamarec_cache: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_custom(tmp_path / "c")
    five, _ = processed_dir("custom", root, min_uc=5, min_sc=5)
    three, _ = processed_dir("custom", root, min_uc=3, min_sc=5)
    three_b, raw_root = processed_dir("custom", root, min_uc=3, min_sc=4)
    assert len({five, three, three_b}) == 3
    assert raw_root == root
    assert five.parent == llamarec_cache / "processed" and five.name.startswith("custom-")

    first = load_dataset("custom", root, min_uc=5, min_sc=4)
    other = load_dataset("custom", root, min_uc=3, min_sc=4)
    assert (first.n_users, first.n_items, other.n_users, other.n_items) == (4, 5, 4, 5)
    assert sorted(p.name for p in (llamarec_cache / "processed").iterdir()) == sorted(
        [processed_dir("custom", root, min_uc=5, min_sc=4)[0].name, three_b.name])

    def fail(*args: object, **kwargs: object) -> Dataset:
        raise AssertionError("preprocess ran although the processed cache holds the dataset")

    monkeypatch.setattr(data_pkg, "preprocess", fail)
    again = load_dataset("custom", root, min_uc=5, min_sc=4)
    assert_same(again, first)
    with pytest.raises(AssertionError):  # a new parameter set is not in the cache
        load_dataset("custom", root, min_uc=4, min_sc=4)


def test_random_ties_have_their_own_cache_entry(tmp_path: Path, llamarec_cache: Path) -> None:
    """The default (``item``) keeps the key of caches made before the option existed."""
    root = write_custom(tmp_path / "c")
    assert processed_dir("custom", root, ties="item") == processed_dir("custom", root)
    assert processed_dir("custom", root, ties="random")[0] != processed_dir("custom", root)[0]
    load_dataset("custom", root, min_uc=3, min_sc=3, ties="random")
    assert Dataset.load(processed_dir("custom", root, min_uc=3, min_sc=3, ties="random")[0]).params["ties"] == "random"
    with pytest.raises(LlamarecError, match="ties='x'"):
        load_dataset("custom", root, min_uc=3, min_sc=3, ties="x")


def test_cache_key_follows_raw_content(tmp_path: Path) -> None:
    root = write_custom(tmp_path / "c")
    before, _ = processed_dir("custom", root)
    ds = load_dataset("custom", root, min_uc=3, min_sc=3)
    with open(root / "items.csv", "a", encoding="utf-8") as fh:
        fh.write("i9,Unused\n")
    after, _ = processed_dir("custom", root)
    assert before != after
    # an identical copy elsewhere shares the cache entry
    copy = write_custom(tmp_path / "copy")
    with open(copy / "items.csv", "a", encoding="utf-8") as fh:
        fh.write("i9,Unused\n")
    assert processed_dir("custom", copy)[0] == after
    assert seqs(load_dataset("custom", root, min_uc=3, min_sc=3)) == seqs(ds)


def test_load_dataset_writes_the_cache(tmp_path: Path, llamarec_cache: Path) -> None:
    root = write_custom(tmp_path / "c", n_users=3, n_items=3)
    ds = load_dataset("custom", root, min_uc=3, min_sc=3)
    cached, _ = processed_dir("custom", root, min_uc=3, min_sc=3)
    assert_same(Dataset.load(cached), ds)
    # u0 at 0, 7 % 3 = 1, 14 % 3 = 2 -> i0, i1, i2; u1 the same shifted by 10
    assert seqs(ds) == [[1, 2, 3]] * 3
    assert ds.params == {"min_uc": 3, "min_sc": 3, "raw_dir": str(root),
                         "filters": {**NOTHING_DROPPED, "raw_users": 3, "raw_interactions": 9}}


# --------------------------------------------------------------------------- split


def test_leave_one_out() -> None:
    seq = np.array([5, 3, 8, 1, 9], dtype=np.int64)
    assert train_sequence(seq).tolist() == [5, 3, 8]
    hist, target = history_and_target(seq, "val")
    assert hist.tolist() == [5, 3, 8] and target == 1 and isinstance(target, int)
    hist, target = history_and_target(seq, "test")
    assert hist.tolist() == [5, 3, 8, 1] and target == 9


def test_eval_examples() -> None:
    ds = Dataset("t", [np.array([1, 2, 3]), np.array([4, 2, 1, 3])], ["", "a", "b", "c", "d"],
                 ["", "1", "2", "3", "4"], ["u", "v"], {})
    hists, targets = eval_examples(ds, "val")
    assert [h.tolist() for h in hists] == [[1], [4, 2]]
    assert targets.tolist() == [2, 1] and targets.dtype == np.int64
    hists, targets = eval_examples(ds, "test")
    assert [h.tolist() for h in hists] == [[1, 2], [4, 2, 1]]
    assert targets.tolist() == [3, 3]


def test_pad_left() -> None:
    out = pad_left([[1, 2], np.array([3, 4, 5, 6, 7]), [], np.array([8, 9, 10])], 3)
    assert out.dtype == torch.long
    assert out.tolist() == [[0, 1, 2], [5, 6, 7], [0, 0, 0], [8, 9, 10]]
    assert pad_left([], 4).shape == (0, 4)
