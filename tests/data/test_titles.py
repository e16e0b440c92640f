"""Title normalisation: MovieLens articles, cleaning, HTML entities, placeholders."""

from __future__ import annotations

import math

import pytest

from llamarec.data.titles import clean_title, is_missing_title, movielens_title


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
