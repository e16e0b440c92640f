"""Bad input: every problem is one LlamarecError line naming the file and the line/column/value,
and nothing half-written is left in the processed cache."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from llamarec.data import load_dataset, processed_dir
from llamarec.data.dataset import Dataset
from llamarec.data.tables import read_table
from llamarec.errors import LlamarecError

GOOD_RATINGS = "userId,movieId,rating,timestamp\n1,1,4.0,10\n1,2,4.0,11\n1,3,4.0,12\n2,1,3.0,5\n"
GOOD_MOVIES = 'movieId,title,genres\n1,Toy Story (1995),Animation\n2,"Godfather, The (1972)",Crime\n' \
              "3,Heat (1995),Action\n"


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def ml_dir(root: Path, ratings: str | bytes = GOOD_RATINGS, movies: str | bytes = GOOD_MOVIES) -> Path:
    write(root / "ratings.csv", ratings)
    write(root / "movies.csv", movies)
    return root


def custom_dir(root: Path, interactions: str | bytes, items: str | bytes = "item_id,title\na,A\nb,B\nc,C\n"
               ) -> Path:
    write(root / "interactions.csv", interactions)
    write(root / "items.csv", items)
    return root


def fails(name: str, root: Path, cache: Path, *parts: str, **kwargs: int) -> str:
    """Load must raise one line containing every part, leaving nothing in the processed cache."""
    with pytest.raises(LlamarecError) as info:
        load_dataset(name, root, **kwargs)
    msg = str(info.value)
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"
    assert "\n" not in msg
    processed = cache / "processed"
    assert not processed.exists() or list(processed.iterdir()) == []
    return msg


def test_missing_file(tmp_path: Path, llamarec_cache: Path) -> None:
    root = tmp_path / "c"
    write(root / "interactions.csv", "user_id,item_id,position\nu,a,0\n")
    fails("custom", root, llamarec_cache, str(root), "no custom files found",
          "expected interactions.csv+items.csv")
    ml = tmp_path / "ml"
    write(ml / "ratings.csv", GOOD_RATINGS)
    fails("ml-latest-small", ml, llamarec_cache, str(ml), "expected ratings.csv+movies.csv")


def test_read_table_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LlamarecError, match=r"nope\.csv: file not found"):
        read_table(tmp_path / "nope.csv", ["a"])


def test_missing_column(tmp_path: Path, llamarec_cache: Path) -> None:
    root = ml_dir(tmp_path / "ml", ratings="userId,itemId,rating,timestamp\n1,1,4.0,10\n")
    fails("ml-latest-small", root, llamarec_cache, f"{root / 'ratings.csv'}: missing column(s) movieId",
          "expected userId, movieId, timestamp", "found userId, itemId, rating, timestamp")


def test_missing_column_custom(tmp_path: Path, llamarec_cache: Path) -> None:
    root = custom_dir(tmp_path / "c", "user,item_id,timestamp\nu,a,1\n")
    fails("custom", root, llamarec_cache, f"{root / 'interactions.csv'}: missing column(s) user_id",
          "(and optionally timestamp, position)", "found user, item_id, timestamp")
    root = custom_dir(tmp_path / "d", "user_id,item_id,rating\nu,a,1\n")
    fails("custom", root, llamarec_cache, f"{root / 'interactions.csv'}: needs a 'timestamp' or "
          "'position' column", "found user_id, item_id, rating")
    root = custom_dir(tmp_path / "e", "user_id,item_id,position\nu,a,1\n", items="item_id,name\na,A\n")
    fails("custom", root, llamarec_cache, f"{root / 'items.csv'}: missing column(s) title")


def test_non_numeric_timestamp(tmp_path: Path, llamarec_cache: Path) -> None:
    ratings = "userId,movieId,rating,timestamp\n1,1,4.0,10\n1,2,4.0,11\n1,3,4.0,yesterday\n2,1,3,x\n"
    root = ml_dir(tmp_path / "ml", ratings=ratings)
    # header is line 1: the first bad row is line 4
    fails("ml-latest-small", root, llamarec_cache,
          f"{root / 'ratings.csv'} line 4: column 'timestamp' has value 'yesterday'; expected a number")


def test_non_numeric_position(tmp_path: Path, llamarec_cache: Path) -> None:
    root = custom_dir(tmp_path / "c", "user_id,item_id,position\nu,a,0\nu,b,first\n")
    fails("custom", root, llamarec_cache,
          f"{root / 'interactions.csv'} line 3: column 'position' has value 'first'; expected a number")


@pytest.mark.parametrize(("row", "column", "value"), [
    ("1,12.5,4.0,13", "movieId", "12.5"),
    ("abc,3,4.0,13", "userId", "abc"),
    ("1,,4.0,13", "movieId", ""),
    ("1,inf,4.0,13", "movieId", "inf"),
])
def test_non_integer_movielens_id(tmp_path: Path, llamarec_cache: Path, row: str, column: str,
                                  value: str) -> None:
    root = ml_dir(tmp_path / "ml", ratings=GOOD_RATINGS + row + "\n")
    fails("ml-latest-small", root, llamarec_cache,
          f"{root / 'ratings.csv'} line 6: column {column!r} has value {value!r}; expected an integer")


def test_non_integer_movie_id_in_movies(tmp_path: Path, llamarec_cache: Path) -> None:
    root = ml_dir(tmp_path / "ml", movies=GOOD_MOVIES + "tt01,Other (2000),Drama\n")
    fails("ml-latest-small", root, llamarec_cache,
          f"{root / 'movies.csv'} line 5: column 'movieId' has value 'tt01'; expected an integer")


def test_non_integer_id_in_headerless_file(tmp_path: Path, llamarec_cache: Path) -> None:
    root = tmp_path / "100k"
    write(root / "u.data", "196\t242\t3\t881250949\n186\tx302\t3\t891717742\n")
    write(root / "u.item", b"242|Kolya (1996)|" + b"|" * 21 + b"\n")
    # no header: the first line is line 1
    fails("ml-100k", root, llamarec_cache,
          f"{root / 'u.data'} line 2: column 'item' has value 'x302'; expected an integer")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path: Path, llamarec_cache: Path, content: str) -> None:
    root = custom_dir(tmp_path / "c", "user_id,item_id,position\nu,a,0\n", items=content)
    fails("custom", root, llamarec_cache, f"{root / 'items.csv'}: file is empty")


def test_header_only_file(tmp_path: Path, llamarec_cache: Path) -> None:
    root = ml_dir(tmp_path / "ml", ratings="userId,movieId,rating,timestamp\n")
    fails("ml-latest-small", root, llamarec_cache, f"{root / 'ratings.csv'}: no data rows")
    root = custom_dir(tmp_path / "c", "user_id,item_id,position\nu,a,0\n", items="item_id,title\r\n\r\n")
    fails("custom", root, llamarec_cache, f"{root / 'items.csv'}: no data rows")


def test_duplicate_ratings_name_both_lines(tmp_path: Path, llamarec_cache: Path) -> None:
    ratings = GOOD_RATINGS + "2,3,1.0,7\n1,2,5.0,11\n"  # line 7 repeats (1, 2, 11) of line 3
    root = ml_dir(tmp_path / "ml", ratings=ratings)
    fails("ml-latest-small", root, llamarec_cache, f"{root / 'ratings.csv'} lines 3 and 7: duplicate rating",
          "user='1'", "item='2'", "expected each rating once")


def test_duplicate_custom_interactions(tmp_path: Path, llamarec_cache: Path) -> None:
    root = custom_dir(tmp_path / "c", "user_id,item_id,timestamp\nu,a,1\nu,b,2\nv,a,1\nu,a,1\n")
    fails("custom", root, llamarec_cache, f"{root / 'interactions.csv'} lines 2 and 5: duplicate interaction")
    root = custom_dir(tmp_path / "d", "user_id,item_id,position\nu,a,0\nu,b,1\nv,a,1\nu,c,1\n")
    fails("custom", root, llamarec_cache, f"{root / 'interactions.csv'} lines 3 and 5: duplicate position",
          "user_id='u'")


def test_duplicate_item_id(tmp_path: Path, llamarec_cache: Path) -> None:
    root = custom_dir(tmp_path / "c", "user_id,item_id,position\nu,a,0\nu,b,1\nu,c,2\n",
                      items="item_id,title\na,A\nb,B\n a ,Again\nc,C\n")
    fails("custom", root, llamarec_cache,
          f"{root / 'items.csv'} lines 2 and 4: duplicate item id (item_id='a'); expected each item id once")
    root = ml_dir(tmp_path / "ml", movies=GOOD_MOVIES + "2,Other (1990),Drama\n")
    fails("ml-latest-small", root, llamarec_cache, f"{root / 'movies.csv'} lines 3 and 5: duplicate item id")


def test_empty_id(tmp_path: Path, llamarec_cache: Path) -> None:
    root = custom_dir(tmp_path / "c", "user_id,item_id,position\nu,a,0\n  ,b,1\n")
    fails("custom", root, llamarec_cache,
          f"{root / 'interactions.csv'} line 3: column 'user_id' is empty; expected an id")


def test_invalid_utf8(tmp_path: Path, llamarec_cache: Path) -> None:
    ratings = GOOD_RATINGS.encode() + b"2,2,3.0,6\n2,3,3.0,\xff7\n"
    root = ml_dir(tmp_path / "ml", ratings=ratings)
    fails("ml-latest-small", root, llamarec_cache,
          f"{root / 'ratings.csv'} line 7: byte 0xff is not valid utf-8", "expected utf-8-encoded text")
    movies = GOOD_MOVIES.encode().replace(b"Heat", b"H\xe9at")  # latin-1, not UTF-8
    root = ml_dir(tmp_path / "ml2", movies=movies)
    fails("ml-latest-small", root, llamarec_cache, f"{root / 'movies.csv'} line 4: byte 0xe9")


def test_unparsable_table(tmp_path: Path, llamarec_cache: Path) -> None:
    root = custom_dir(tmp_path / "c", "user_id,item_id,position\nu,a,0\nu,b,1,extra\n")
    fails("custom", root, llamarec_cache,
          f"{root / 'interactions.csv'}: cannot parse as a ','-separated table", "saw 4")
    root = custom_dir(tmp_path / "d", 'user_id,item_id,position\nu,"a,0\n')
    fails("custom", root, llamarec_cache, f"{root / 'interactions.csv'}: cannot parse")


def test_bad_amazon_meta(tmp_path: Path, llamarec_cache: Path) -> None:
    root = tmp_path / "a"
    write(root / "ratings_Beauty.csv", "A1,B1,5.0,1\nA1,B2,5.0,2\nA1,B3,5.0,3\n")
    with gzip.open(root / "meta_Beauty.json.gz", "wt", encoding="utf-8") as fh:
        fh.write("{'asin': 'B1', 'title': 'One'}\n{'asin': 'B2', 'title': 'Two'\n")
    fails("beauty", root, llamarec_cache, f"{root / 'meta_Beauty.json.gz'} line 2: not a JSON object")
    write(root / "ratings_Beauty.csv", "A1,B1,5.0,1\nA1,B2,5.0,soon\n")
    fails("beauty", root, llamarec_cache,
          f"{root / 'ratings_Beauty.csv'} line 2: column 'time' has value 'soon'; expected a number")


def test_empty_after_filtering(tmp_path: Path, llamarec_cache: Path) -> None:
    root = ml_dir(tmp_path / "ml")
    fails("ml-latest-small", root, llamarec_cache, str(root),
          "no interactions left after dropping untitled items and 5/5-core filtering")
    # titles exist, but none of the rated items has one
    root = custom_dir(tmp_path / "c", "user_id,item_id,position\nu,x,0\nu,y,1\nu,z,2\n")
    fails("custom", root, llamarec_cache, "no interactions left", min_uc=3, min_sc=1)


# --------------------------------------------------------------------------- line numbers


def test_line_numbers_count_blank_lines(tmp_path: Path, llamarec_cache: Path) -> None:
    ratings = "userId,movieId,rating,timestamp\n1,1,4.0,10\n\n1,2,4.0,11\n   \n1,3,4.0,late\n"
    root = ml_dir(tmp_path / "ml", ratings=ratings)
    fails("ml-latest-small", root, llamarec_cache, f"{root / 'ratings.csv'} line 6: column 'timestamp'")


def test_line_numbers_count_quoted_newlines(tmp_path: Path, llamarec_cache: Path) -> None:
    items = 'item_id,title\na,"A title\r\nover two lines"\r\nb,B\r\na,Again\r\n'
    root = custom_dir(tmp_path / "c", "user_id,item_id,position\nu,a,0\n", items=items)
    fails("custom", root, llamarec_cache, f"{root / 'items.csv'} lines 2 and 5: duplicate item id")


def test_blank_lines_are_skipped_not_rejected(tmp_path: Path) -> None:
    root = custom_dir(tmp_path / "c", "\nuser_id,item_id,position\n\nu,a,0\r\n  \nu,b,1\nu,c,2\n\n\n",
                      items="item_id,title\na,\"A\nB\"\n\nb,B\nc,C\n")
    ds = load_dataset("custom", root, min_uc=3, min_sc=1)
    assert [s.tolist() for s in ds.sequences] == [[1, 2, 3]]
    assert ds.titles == ["", "A B", "B", "C"]
    # a row of empty fields is not a blank line: it is still an error
    root = custom_dir(tmp_path / "d", "user_id,item_id,position\nu,a,0\n,,\nu,b,1\n")
    with pytest.raises(LlamarecError, match=r"line 3: column 'user_id' is empty"):
        load_dataset("custom", root, min_uc=3, min_sc=1)


def test_real_items_file_line_numbers(tmp_path: Path, shared_data: Path, llamarec_cache: Path) -> None:
    # beauty/items.csv holds a title with a newline inside quotes (lines 10616-10617)
    src = shared_data / "beauty"
    root = tmp_path / "beauty"
    root.mkdir()
    (root / "interactions.csv").symlink_to(src / "interactions.csv")
    items = (src / "items.csv").read_bytes()
    n_lines = items.count(b"\n")
    first_id = items.split(b"\n")[1].split(b",")[0].decode()
    (root / "items.csv").write_bytes(items + first_id.encode() + b",Duplicate\n")
    fails("custom", root, llamarec_cache,
          f"{root / 'items.csv'} lines 2 and {n_lines + 1}: duplicate item id (item_id={first_id!r})")


# --------------------------------------------------------------------------- cache safety


def test_failed_prepare_keeps_existing_cache(tmp_path: Path, llamarec_cache: Path) -> None:
    root = custom_dir(tmp_path / "c", "user_id,item_id,position\nu,a,0\nu,b,1\nu,c,2\nv,c,0\nv,a,1\nv,b,2\n")
    good = load_dataset("custom", root, min_uc=3, min_sc=1)
    cached, _ = processed_dir("custom", root, min_uc=3, min_sc=1)
    before = {p.name: p.read_bytes() for p in cached.iterdir()}
    # same directory, now broken: the prepare fails and the earlier result is untouched
    write(root / "interactions.csv", "user_id,item_id,position\nu,a,0\nu,b,x\n")
    with pytest.raises(LlamarecError, match="line 3: column 'position' has value 'x'"):
        load_dataset("custom", root, min_uc=3, min_sc=1)
    write(root / "interactions.csv", "user_id,item_id,position\nu,a,0\nu,b,1\nu,c,2\n")
    with pytest.raises(LlamarecError, match="no interactions left"):
        load_dataset("custom", root, min_uc=3, min_sc=2)
    assert [p.name for p in (llamarec_cache / "processed").iterdir()] == [cached.name]
    assert {p.name: p.read_bytes() for p in cached.iterdir()} == before
    again = Dataset.load(cached)
    assert [s.tolist() for s in again.sequences] == [s.tolist() for s in good.sequences] == [[1, 2, 3],
                                                                                          [3, 1, 2]]
    assert again.titles == good.titles == ["", "A", "B", "C"]


# --------------------------------------------------------------------------- values no reader may accept


@pytest.mark.parametrize("value", ["inf", "-inf", "Infinity", "1e400", "-1e999"])
def test_infinite_timestamp(tmp_path: Path, llamarec_cache: Path, value: str) -> None:
    root = custom_dir(tmp_path / "c", f"user_id,item_id,timestamp\nu,a,1\nu,b,{value}\n")
    fails("custom", root, llamarec_cache, f"{root / 'interactions.csv'} line 3: column 'timestamp' "
          f"has value {value!r}; expected a finite number")
    ml = ml_dir(tmp_path / "ml", ratings=GOOD_RATINGS + f"2,2,3.0,{value}\n")
    fails("ml-latest-small", ml, llamarec_cache,
          f"{ml / 'ratings.csv'} line 6: column 'timestamp' has value {value!r}; expected a finite number")


def test_id_beyond_int64_in_movielens(tmp_path: Path, llamarec_cache: Path) -> None:
    root = ml_dir(tmp_path / "ml", ratings=GOOD_RATINGS + "1,99999999999999999999,4.0,13\n")
    fails("ml-latest-small", root, llamarec_cache, f"{root / 'ratings.csv'} line 6: column 'movieId' "
          "has value '99999999999999999999'; expected an integer")


@pytest.mark.parametrize(("header", "name", "columns"), [
    ("user_id,item_id,item_id,timestamp", "item_id", "2 and 3"),
    ("user_id,item_id,timestamp, user_id", "user_id", "1 and 4"),  # equal once stripped
    ("user_id,item_id,timestamp,note,note", "note", "4 and 5"),  # even an ignored column
])
def test_duplicated_header_column(tmp_path: Path, llamarec_cache: Path, header: str, name: str,
                                  columns: str) -> None:
    row = ",".join(["u", "a", "1", "x", "y"][: header.count(",") + 1])
    root = custom_dir(tmp_path / "c", f"{header}\n{row}\n")
    fails("custom", root, llamarec_cache, f"{root / 'interactions.csv'} line 1: column {name!r} appears "
          f"twice in the header (columns {columns}); expected each column name once")


def test_duplicated_header_column_in_items_and_movies(tmp_path: Path, llamarec_cache: Path) -> None:
    root = custom_dir(tmp_path / "c", "user_id,item_id,position\nu,a,0\n",
                      items="\n\nitem_id,title,title\na,A,B\n")
    fails("custom", root, llamarec_cache, f"{root / 'items.csv'} line 3: column 'title' appears twice")
    ml = ml_dir(tmp_path / "ml", movies="movieId,title,movieId\n1,Heat (1995),2\n")
    fails("ml-latest-small", ml, llamarec_cache, f"{ml / 'movies.csv'} line 1: column 'movieId' appears twice")


def test_empty_header_names_are_not_duplicates(tmp_path: Path) -> None:
    root = custom_dir(tmp_path / "c", "user_id,item_id,position,,\nu,a,0,,\nu,b,1,,\nu,c,2,,\n")
    assert load_dataset("custom", root, min_uc=3, min_sc=1).n_items == 3


@pytest.mark.parametrize(("interactions", "items", "file", "line", "column", "value"), [
    ("user_id,item_id,position\nu\x00,a,0\n", None, "interactions.csv", 2, "user_id", "u\x00"),
    ("user_id,item_id,position\nu,a,0\nu,b\x00c,1\n", None, "interactions.csv", 3, "item_id", "b\x00c"),
    ("user_id,item_id,position\nu,a,0\n", "item_id,title\na,A\n\x00b,B\n", "items.csv", 3, "item_id", "\x00b"),
])
def test_nul_byte_in_an_id(tmp_path: Path, llamarec_cache: Path, interactions: str, items: str | None,
                           file: str, line: int, column: str, value: str) -> None:
    root = custom_dir(tmp_path / "c", interactions, *([items] if items else []))
    fails("custom", root, llamarec_cache, f"{root / file} line {line}: column {column!r} has value "
          f"{value!r} with a NUL byte; expected an id without control characters")


def test_other_control_character_in_an_id(tmp_path: Path, llamarec_cache: Path) -> None:
    root = custom_dir(tmp_path / "c", "user_id,item_id,position\nu,a,0\nu,\x1b[31mb,1\n")
    fails("custom", root, llamarec_cache, "line 3: column 'item_id' has value '\\x1b[31mb' with the "
          "control character U+001B")
    amazon = tmp_path / "a"
    write(amazon / "ratings_Beauty.csv", "A1,B1,5.0,1\nA\x002,B2,5.0,2\n")
    with gzip.open(amazon / "meta_Beauty.json.gz", "wt", encoding="utf-8") as fh:
        fh.write("{'asin': 'B1', 'title': 'One'}\n")
    fails("beauty", amazon, llamarec_cache, f"{amazon / 'ratings_Beauty.csv'} line 2: column 'user' "
          "has value 'A\\x002' with a NUL byte")


@pytest.mark.parametrize("value", ["-1", "0.5", "2.25", "-0.5", "inf", "nan"])
def test_negative_or_fractional_position(tmp_path: Path, llamarec_cache: Path, value: str) -> None:
    root = custom_dir(tmp_path / "c", f"user_id,item_id,position\nu,a,0\nu,b,{value}\nu,c,2\n")
    expected = "expected a whole number >= 0" if value not in ("inf", "nan") else "expected a"
    fails("custom", root, llamarec_cache, f"{root / 'interactions.csv'} line 3: column 'position' "
          f"has value {value!r}", expected)


def test_whole_positions_written_as_floats_are_fine(tmp_path: Path) -> None:
    root = custom_dir(tmp_path / "c", "user_id,item_id,position\nu,a,2.0\nu,b,0\nu,c,1.00\n")
    assert [s.tolist() for s in load_dataset("custom", root, min_uc=3, min_sc=1).sequences] == [[2, 3, 1]]


@pytest.mark.parametrize("title", [
    " ", "\t", "\u200b", "\u200b\u200c\u200d\u2060\ufeff", "\u202e", "\u202a\u202c\u2066\u2069",
    "\u00a0", "&nbsp;", "\u3000", "\x01\x02", " \u200b \u202e ", "\u3164", "\u2800", "\ufe0f",
])
def test_title_of_only_invisible_characters(tmp_path: Path, llamarec_cache: Path, title: str) -> None:
    root = custom_dir(tmp_path / "c", "user_id,item_id,position\nu,a,0\nu,b,1\nu,c,2\n",
                      items=f'item_id,title\na,A\nb,"{title}"\nc,C\n')
    fails("custom", root, llamarec_cache, f"{root / 'items.csv'} line 3: column 'title' has value "
          f"{title!r}, only invisible characters", "expected a title, or an empty field")


def test_empty_title_is_still_an_untitled_item(tmp_path: Path) -> None:
    root = custom_dir(tmp_path / "c", "user_id,item_id,position\nu,a,0\nu,b,1\nu,c,2\nu,d,3\n",
                      items="item_id,title\na,A\nb,\nc,C\nd,D\n")
    ds = load_dataset("custom", root, min_uc=3, min_sc=1)
    assert ds.titles == ["", "A", "C", "D"]
    assert ds.stats()["dropped_untitled_items"] == 1
