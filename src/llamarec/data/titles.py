"""Item-title normalisation shared by every dataset."""

from __future__ import annotations

import html
import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"\s+")
# MovieLens moves leading articles to the end: "Godfather, The (1972)". The article may be
# followed by alternative titles in parentheses and the year: "City of Lost Children, The
# (Cité des enfants perdus, La) (1995)".
_TRAILING_ARTICLE = re.compile(
    r"^(?P<main>.+?), (?P<article>The|A|An|Les|La|Le|L'|Il|Das|Die|Der|El|Los|Las|Lo|I|Det|Den|En|Et)"
    r"(?P<rest>(?: \([^()]*\))*)$"
)
PLACEHOLDER_TITLES = frozenset({"", "unknown", "unkonwn"})


def clean_title(title: str, *, unescape_html: bool = False) -> str:
    """Strip control characters and collapse whitespace (optionally unescape HTML entities)."""
    if unescape_html:
        title = html.unescape(title)
    title = _CONTROL.sub(" ", title)
    return _SPACES.sub(" ", title).strip()


def movielens_title(title: str) -> str:
    """Clean a MovieLens title and put a trailing article back in front, keeping the year."""
    title = clean_title(title)
    match = _TRAILING_ARTICLE.match(title)
    if match is None:
        return title
    article = match["article"]
    sep = "" if article.endswith("'") else " "
    return f"{article}{sep}{match['main']}{match['rest']}"


def is_missing_title(title: object) -> bool:
    """True for absent titles, dataset placeholders such as ml-100k's "unknown", and titles
    that cleaning would leave empty (only control characters or entities such as ``&nbsp;``)."""
    return (not isinstance(title, str)
            or clean_title(title, unescape_html=True).lower() in PLACEHOLDER_TITLES)
