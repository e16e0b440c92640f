"""Title normalisation: MovieLens articles, cleaning, HTML entities, placeholders."""

from __future__ import annotations

import math
import unicodedata
from pathlib import Path

import pytest

from llamarec.data import load_dataset
from llamarec.data.titles import clean_title, is_missing_title, movielens_title, normalize_text


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Godfather, The (1972)", "The Godfather (1972)"),
        (
            "City of Lost Children, The (Cité des enfants perdus, La) (1995)",
            "The City of Lost Children (Cité des enfants perdus, La) (1995)",
        ),
        ("American President, An (1995)", "An American President (1995)"),
        ("Bug's Life, A (1998)", "A Bug's Life (1998)"),
        # an apostrophe article is glued to the word that follows it
        ("Avventura, L' (Adventure, The) (1960)", "L'Avventura (Adventure, The) (1960)"),
        ("Misérables, Les (1995)", "Les Misérables (1995)"),
        # no year
        ("Godfather, The", "The Godfather"),
        ("Usual Suspects, The", "The Usual Suspects"),
        # nothing to move
        ("Toy Story (1995)", "Toy Story (1995)"),
        ("Crouching Tiger, Hidden Dragon (Wo hu cang long) (2000)",
         "Crouching Tiger, Hidden Dragon (Wo hu cang long) (2000)"),
        ("Hunt, The Movie (2000)", "Hunt, The Movie (2000)"),
        ("Theory of Everything, Then (2014)", "Theory of Everything, Then (2014)"),
    ],
)
def test_movielens_title_moves_trailing_article(raw: str, expected: str) -> None:
    assert movielens_title(raw) == expected


def test_movielens_title_cleans_before_matching() -> None:
    # control characters become spaces and runs of whitespace collapse, so the article is found
    assert movielens_title("  Godfather,\x00The\t\t(1972)\r\n") == "The Godfather (1972)"
    assert movielens_title("Godfather,   The   (1972)") == "The Godfather (1972)"


def test_movielens_title_does_not_unescape_html() -> None:
    assert movielens_title("Tom &amp; Jerry (1992)") == "Tom &amp; Jerry (1992)"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Toy\tStory\x00  (1995)\n", "Toy Story (1995)"),
        ("a\x7fb", "a b"),  # DEL
        ("a\x85b\x9fc", "a b c"),  # C1 controls
        ("\x01\x02  lead and trail \x1f", "lead and trail"),
        ("many     spaces\n\nand\r\nlines", "many spaces and lines"),
        ("Cité des enfants perdus", "Cité des enfants perdus"),  # non-ASCII letters survive
        ("A &amp; B", "A &amp; B"),  # no unescaping unless asked
    ],
)
def test_clean_title(raw: str, expected: str) -> None:
    assert clean_title(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("A &amp; B", "A & B"),
        ("Rock &#39;n&#39; Roll", "Rock 'n' Roll"),
        ("L&#x27;Or&eacute;al", "L'Oréal"),
        ("a&nbsp;&nbsp;b", "a b"),  # non-breaking spaces collapse like any whitespace
        ("x &lt;3&gt; y", "x <3> y"),
        ("&amp;amp;", "&amp;"),  # unescaped once, not repeatedly
    ],
)
def test_clean_title_unescapes_html_for_amazon(raw: str, expected: str) -> None:
    assert clean_title(raw, unescape_html=True) == expected


@pytest.mark.parametrize(
    "title", [None, math.nan, 3, "", "   ", "\t\n", "unknown", "Unknown", " UNKNOWN ", "unkonwn", "Unkonwn",
              # nothing left once cleaned
              "\x01\x02", " \x7f\x85 ", "\x00unknown\x1f", "&nbsp;", "unknown&nbsp;"]
)
def test_placeholders_are_missing(title: object) -> None:
    assert is_missing_title(title)


@pytest.mark.parametrize("title", ["x", "Unknown Soldier (1998)", "The Unknown (1927)", "unknowns"])
def test_real_titles_are_not_missing(title: str) -> None:
    assert not is_missing_title(title)


# --------------------------------------------------------------------------- untrusted text


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Item 21 \u202egnp.exe", "Item 21 gnp.exe"),  # right-to-left override
        ("a\u202ab\u202cc\u2066d\u2069e\u200ef\u200fg\u061ch", "abcdefgh"),  # bidi controls
        ("zero\u200bwidth\u200c\u200d\u2060\ufeff", "zerowidth"),
        ("soft\u00adhyphen", "softhyphen"),
        ("tag\U000e0041\U000e007f", "tag"),  # tag characters
        ("private\ue000use", "privateuse"),
        ("filler\u3164 \u115f\u1160\uffa0\u2800 blank", "filler blank"),
        ("emoji\ufe0f\u034f", "emoji"),  # variation selector, combining grapheme joiner
        ("\uff34\uff4f\uff59 \uff33\uff54\uff4f\uff52\uff59 (\uff11\uff19\uff19\uff15)",
         "Toy Story (1995)"),  # fullwidth
        ("\ufb01ne \u2460 \u00bd", "fine 1 1\u20442"),  # compatibility forms
        ("Cafe\u0301", "Caf\u00e9"),  # composed
        ("e\u200b\u0301", "\u00e9"),  # an invisible character does not keep NFKC from composing
        ("a\u00a0\u2003\u3000\u2028b", "a b"),  # Unicode spaces and separators
        *[(t, t) for t in ["Cit\u00e9 \u6771\u4eac \u0645\u0631\u062d\u0628\u0627"]],  # other scripts stay
        ("", ""),
    ],
)
def test_normalize_text(raw: str, expected: str) -> None:
    assert normalize_text(raw) == expected
    assert normalize_text(expected) == expected  # idempotent
    assert clean_title(raw) == expected


def test_normalized_text_has_no_invisible_characters() -> None:
    every = "".join(chr(c) for c in range(0x20000) if not 0xD800 <= c <= 0xDFFF)
    out = normalize_text(every)
    assert unicodedata.is_normalized("NFKC", out)
    assert not {c for c in out if unicodedata.category(c) in ("Cc", "Cf", "Co", "Cs")}
    assert "\u3164" not in out and "\u2800" not in out
    assert "  " not in out and out == out.strip()


def test_titles_are_normalised_when_loaded(tmp_path: Path) -> None:
    """The catalogue (and so the prompt and recommend's output) only sees the normalised title."""
    root = tmp_path / "c"
    root.mkdir()
    (root / "interactions.csv").write_text(
        "user_id,item_id,position\nu,a,0\nu,b,1\nu,c,2\n", encoding="utf-8")
    (root / "items.csv").write_text(
        "item_id,title\na,Item 21 \u202egnp.exe\nb,\uff34\uff4f\uff59\u200b Story\nc,&#x202E;C&#8203;&nbsp;\n",
        encoding="utf-8")
    ds = load_dataset("custom", root, min_uc=3, min_sc=1)
    assert ds.titles == ["", "Item 21 gnp.exe", "Toy Story", "C"]
