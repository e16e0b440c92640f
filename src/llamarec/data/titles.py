"""Item-title normalisation shared by every dataset.

Titles are untrusted text that ends up in the catalogue, in prompts and on the terminal, so
every loader normalises them the same way (:func:`normalize_text`): Unicode NFKC, control
characters turned into spaces, invisible characters removed (zero-width characters, bidi
controls such as U+202E, which can make "exe.gnp" display as "png.exe", and the other format
characters), whitespace collapsed.
"""

from __future__ import annotations

import html
import re
import unicodedata

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"\s+")
# Invisible characters that are not in a "C" category: Hangul fillers, the braille blank, the
# combining grapheme joiner and the variation selectors.
_INVISIBLE = re.compile(
    "[\u034f\u115f\u1160\u2800\u3164\uffa0\ufe00-\ufe0f\U000e0100-\U000e01ef]"
)
# MovieLens moves leading articles to the end: "Godfather, The (1972)". The article may be
# followed by alternative titles in parentheses and the year: "City of Lost Children, The
# (Cité des enfants perdus, La) (1995)".
_TRAILING_ARTICLE = re.compile(
    r"^(?P<main>.+?), (?P<article>The|A|An|Les|La|Le|L'|Il|Das|Die|Der|El|Los|Las|Lo|I|Det|Den|En|Et)"
    r"(?P<rest>(?: \([^()]*\))*)$"
)
PLACEHOLDER_TITLES = frozenset({"", "unknown", "unkonwn"})


def _drop_invisible(text: str) -> str:
    """Control characters (``Cc``) become spaces; format characters (``Cf``: zero-width
    spaces and joiners, bidi controls, soft hyphens, byte-order marks), private-use and
    surrogate code points and the other invisible characters are removed."""
    text = _INVISIBLE.sub("", text)
    out = []
    for ch in text:
        category = unicodedata.category(ch)
        if category == "Cc":
            out.append(" ")
        elif category not in ("Cf", "Co", "Cs"):
            out.append(ch)
    return "".join(out)


def normalize_text(text: str) -> str:
    """NFKC, invisible characters removed, control characters as spaces, whitespace collapsed."""
    if text.isascii():  # the common case: NFKC leaves ASCII as it is
        return _SPACES.sub(" ", _CONTROL.sub(" ", text)).strip()
    # Invisible characters go before NFKC too, so that they cannot keep it from composing.
    text = _drop_invisible(unicodedata.normalize("NFKC", _drop_invisible(text)))
    return _SPACES.sub(" ", text).strip()


def clean_title(title: str, *, unescape_html: bool = False) -> str:
    """A title as every dataset stores it (see :func:`normalize_text`), after unescaping HTML
    entities if asked."""
    if unescape_html:
        title = html.unescape(title)
    return normalize_text(title)


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
