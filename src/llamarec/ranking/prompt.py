"""The ranking prompt: user history and candidate pool, candidates indexed by letters A..T.

The default template is the one from the LlamaRec paper (Alpaca style)::

    ### Instruction:
    Given user history in chronological order, recommend an item from the candidate pool [...]

    ### Input:
    User history: (1) <title> \\n (2) <title>; \\n Candidate pool: (A) <title> \\n (B) <title>

    ### Response:

(``\\n`` are real newlines.) The text ends right where the answer letter follows. Prompt text is
always encoded with the tokenizer's default special tokens (``add_special_tokens=True``, see
:func:`encode`), both here and when scoring or training.
"""

from __future__ import annotations

import functools
import math
import re
import string
import sys
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

from llamarec.configs import read_config_file, validate
from llamarec.errors import LlamarecError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

RETRIEVER_FIELDS = {"retriever_rank", "retriever_prob"}
"""Optional placeholders of ``candidate_item``: what the retriever thinks of each candidate."""

LETTERS = "ABCDEFGHIJKLMNOPQRST"
"""Index letters of the candidates, in order; the candidate pool holds at most 20 items."""

TITLE_CACHE_SIZE = 200_000
"""Sanitised, cut titles a :class:`PromptBuilder` keeps (the cache is emptied when full)."""

IGNORE_INDEX = -100
"""Label of the tokens that carry no loss (the convention of Hugging Face causal LMs)."""

DEFAULT_INSTRUCTION = (
    "Given user history in chronological order, recommend an item from the candidate pool "
    "with its index letter."
)


def _fields(fmt: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(fmt) if name is not None}


class PromptConfig(BaseModel):
    """How prompts are written; every field can be overridden from a YAML or JSON file.

    The ``*_template`` / ``*_item`` strings are :meth:`str.format` patterns with exactly the
    placeholders named in their descriptions (literal braces are written ``{{`` and ``}}``).
    """

    model_config = ConfigDict(extra="forbid")

    instruction: str = DEFAULT_INSTRUCTION
    template: str = Field(
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        description="whole prompt; placeholders {instruction} and {input}",
    )
    input_template: str = Field(
        "User history: {history}; \n Candidate pool: {candidates}",
        description="the input section; placeholders {history} and {candidates}",
    )
    history_item: str = Field("({index}) {title}", description="placeholders {index}, {title}")
    candidate_item: str = Field(
        "({letter}) {title}",
        description="placeholders {letter}, {title}; optionally {retriever_rank} (1 = the retriever's first "
                    "choice) and {retriever_prob} (its softmax probability over the candidates, in whole percent)")
    separator: str = Field(" \n ", description="between history items and between candidates")
    max_history: int = Field(20, ge=1, description="most recent history items kept")
    max_title_tokens: int = Field(32, ge=1, description="each title is cut to this many tokens")
    max_prompt_tokens: int = Field(2048, ge=1, description="oldest history is dropped beyond it")
    use_chat_template: bool = Field(
        False, description="wrap the prompt as the user turn of the tokenizer's chat template"
    )

    @field_validator("template", "input_template", "history_item", "candidate_item")
    @classmethod
    def _check_placeholders(cls, value: str, info: ValidationInfo) -> str:
        expected = {
            "template": {"instruction", "input"},
            "input_template": {"history", "candidates"},
            "history_item": {"index", "title"},
            "candidate_item": {"letter", "title"},
        }[info.field_name]
        optional = RETRIEVER_FIELDS if info.field_name == "candidate_item" else set()
        try:
            found = _fields(value)
        except ValueError as exc:
            raise ValueError(f"not a valid format string ({exc})") from exc
        if not expected <= found <= expected | optional:
            extra = f" (optionally {sorted(optional)})" if optional else ""
            raise ValueError(f"placeholders must be {sorted(expected)}{extra}, found {sorted(found)}")
        return value

    @property
    def shows_retriever(self) -> bool:
        """Whether candidates are shown with the retriever's rank or probability."""
        return bool(_fields(self.candidate_item) & RETRIEVER_FIELDS)

    @classmethod
    def from_file(cls, path: str | Path) -> PromptConfig:
        """Read a ``.yaml``/``.yml`` or ``.json`` config; missing fields keep their defaults."""
        path = Path(path)
        if path.suffix.lower() not in {".yaml", ".yml", ".json"}:
            raise LlamarecError(f"{path}: prompt config must be a .yaml, .yml or .json file")
        return validate(cls, read_config_file(path), str(path))


# An index marker: one letter (of any script, with any combining marks) or one to three
# digits, either in round or square brackets, "(B)", "[B]", "( 12. )", or followed by a
# closing bracket alone, "B)"; spaces and punctuation such as "." or ":" may pad the letter.
# Built on first use: the class of combining marks comes from unicodedata.
_MARKER_PATTERN = (
    r"[(\[]{pad}(?P<inside>[^\W\d_]{marks}*|\d{{1,3}}){pad}[)\]]"
    r"|(?<![^\W_])(?P<bare>[^\W\d_]{marks}*|\d{{1,3}}){pad}(?P<close>[)\]])"
)
_MARKER_PAD = r"[\s.,:;!?*'\"`~-]*"


@functools.cache
def _index_marker() -> re.Pattern[str]:
    marks = [c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)).startswith("M")]
    spans: list[list[int]] = []
    for c in marks:
        if spans and spans[-1][1] == c - 1:
            spans[-1][1] = c
        else:
            spans.append([c, c])
    cls = "[" + "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in spans) + "]"
    return re.compile(_MARKER_PATTERN.format(marks=cls, pad=_MARKER_PAD))


_OPENING = {")": "(", "]": "["}
_HASH_RUN = re.compile(r"#(?:\s*#)+")
# Copies of the default prompt's labels, followed by a colon or a colon look-alike.
_LABEL = re.compile(
    r"\b(?P<label>instruction|input|response|user\s+history|candidate\s+pool)\s*[:\u02d0\u05c3\u2236\ua789]",
    re.IGNORECASE,
)
UNTITLED = "(no title)"
"""What the prompt shows for a title that is empty once sanitised."""


def _unmark(match: re.Match[str]) -> str:
    """An index marker as its bare letter or number (without combining marks); ``2)`` that
    closes an earlier ``(`` is kept."""
    if match["bare"] is not None:
        before = match.string[: match.start()]
        if before.count(_OPENING[match["close"]]) > before.count(match["close"]):
            return match[0]
    token = match["inside"] or match["bare"]
    return token if token[0].isdigit() else unicodedata.normalize("NFD", token)[0]


def sanitize_title(title: str, special_tokens: Iterable[str] = ()) -> str:
    """Make an item title safe to paste into the prompt: titles are data, never instructions.

    In this order:

    1. Unicode NFKC, so that fullwidth and other compatibility forms (``＃＃＃``, ``（Ｂ）``)
       become the characters they imitate;
    2. control characters (Unicode category ``Cc``: newlines, tabs, ...) become spaces; the other
       ``C*`` characters (format characters such as zero-width spaces and bidi controls,
       surrogates, private use, unassigned) are removed, and so are combining marks that
       are not on a letter (on a space, a digit or ASCII punctuation), so they cannot hide the
       patterns below;
    3. runs of whitespace collapse to one space and the ends are stripped: a title is one line;
    4. index markers lose their brackets until none is left: one letter (with any combining
       marks, ``B́``) or one to three digits in round or square brackets, ``(C)``, ``( c )``,
       ``[C]``, ``[12]``, ``((C))``, ``(C.)``, or before a closing bracket that closes
       nothing, ``C)``;
       they become the bare letter without its marks or the number (``C``, ``12``), so a
       title cannot imitate a candidate letter or a history number; four-digit years such as
       ``(1995)`` and brackets around more than one character are kept;
    5. runs of ``#`` (also with spaces between them) become one ``#``, so no title contains a
       ``###`` section marker;
    6. copies of the default prompt's labels followed by a colon (``Instruction:``,
       ``Input:``, ``Response:``, ``User history:``, ``Candidate pool:``, in any case) get a
       dash instead of the colon (``Response -``);
    7. every occurrence of a string in ``special_tokens`` (at least two characters long, e.g.
       ``<|im_end|>``) gets a space after its first character (``< |im_end|>``), so the
       tokenizer reads it as plain text instead of a control token.

    A title left empty is shown as :data:`UNTITLED`.
    """
    chars: list[str] = []
    for ch in unicodedata.normalize("NFKC", title):
        category = unicodedata.category(ch)
        if category == "Cc":
            chars.append(" ")
        elif category.startswith("M") and (not chars or chars[-1].isascii() and not chars[-1].isalpha()):
            continue  # a combining mark on nothing, a space, a digit or punctuation
        elif not category.startswith("C"):
            chars.append(ch)
    text = " ".join("".join(chars).split())
    while (unmarked := _index_marker().sub(_unmark, text)) != text:
        text = unmarked
    text = _HASH_RUN.sub("#", text)
    text = _LABEL.sub(lambda m: f"{m['label']} -", text)
    for token in sorted(special_tokens, key=len, reverse=True):
        if len(token) >= 2 and token in text:
            text = text.replace(token, f"{token[0]} {token[1:]}")
    return text or UNTITLED


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of prompt text, with the tokenizer's default special tokens (e.g. BOS)."""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def answer_token_id(tokenizer: PreTrainedTokenizerBase, prompt: str, letter: str) -> int:
    """The one token that ``letter`` adds when it directly follows ``prompt``.

    Raises :class:`LlamarecError` unless ``encode(prompt + letter)`` is ``encode(prompt)`` plus
    exactly one token: otherwise the letter cannot be read from the next-token logits.
    """
    base = encode(tokenizer, prompt)
    full = encode(tokenizer, prompt + letter)
    if len(full) != len(base) + 1 or full[: len(base)] != base:
        start = 0
        while start < min(len(base), len(full)) and base[start] == full[start]:
            start += 1
        got = tokenizer.convert_ids_to_tokens(full[start:])
        replaced = len(base) - start
        raise LlamarecError(
            f"answer letter {letter!r} is not one token after the prompt: the prompt's end "
            f"tokenises to {got!r} when {letter!r} follows"
            + (f" (replacing its last {replaced} token(s))" if replaced else "")
            + "; use a tokenizer or template where each letter is a single token"
        )
    return full[-1]


def retriever_fields(scores: Sequence[float] | None, n: int) -> list[dict[str, int]]:
    """``{retriever_rank, retriever_prob}`` per candidate from the retriever's scores: rank 1 is
    the highest score, the probability is the softmax over the candidates in whole percent."""
    if scores is None or len(scores) != n:
        raise LlamarecError(f"this prompt shows the retriever's rank or probability: it needs {n} retriever "
                            f"scores, got {'none' if scores is None else len(scores)}")
    values = [float(s) for s in scores]
    top = max(values)
    weights = [math.exp(v - top) for v in values]
    ranks = {j: rank for rank, j in enumerate(sorted(range(n), key=lambda j: -values[j]), 1)}
    return [{"retriever_rank": ranks[j], "retriever_prob": round(100 * w / sum(weights))}
            for j, w in enumerate(weights)]


@dataclass(frozen=True)
class TrainingExample:
    """Prompt plus answer letter, with labels for a loss on the answer token only.

    ``labels`` is aligned with ``input_ids`` (Hugging Face causal LMs shift it internally): it
    is :data:`IGNORE_INDEX` everywhere except at ``answer_position``. No EOS is appended: the
    ranker only ever reads the first token after the prompt, so that is the only one trained.
    """

    text: str
    input_ids: list[int]
    labels: list[int]
    answer_position: int


class PromptBuilder:
    """Builds ranking prompts for one tokenizer and one :class:`PromptConfig`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: PromptConfig | None = None):
        self.tokenizer = tokenizer
        self.config = config or PromptConfig()
        if self.config.use_chat_template and not getattr(tokenizer, "chat_template", None):
            raise LlamarecError(
                "use_chat_template is set but the tokenizer has no chat template; "
                "set use_chat_template: false or use an instruct model's tokenizer"
            )
        self._special_tokens = _special_token_strings(tokenizer)
        self._titles: dict[str, str] = {}

    def title(self, title: str) -> str:
        """A sanitised title (see :func:`sanitize_title`) cut to ``max_title_tokens`` tokens.

        The cut keeps an exact prefix of the sanitised title (counted without special tokens),
        ending at a token boundary, with trailing spaces removed. Each title is tokenized once:
        results are cached (up to :data:`TITLE_CACHE_SIZE` titles).
        """
        cut = self._titles.get(title)
        if cut is None:
            if len(self._titles) >= TITLE_CACHE_SIZE:
                self._titles.clear()
            cut = self._titles[title] = self._cut_title(title)
        return cut

    def _cut_title(self, title: str) -> str:
        text = sanitize_title(title, self._special_tokens)
        limit = self.config.max_title_tokens
        try:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:  # tokenizers without offsets: cut by decoding
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) <= limit:
                return text
            return self.tokenizer.decode(ids[:limit]).rstrip("\ufffd").rstrip()
        if len(enc["input_ids"]) <= limit:
            return text
        return text[: enc["offset_mapping"][limit - 1][1]].rstrip()

    def build(self, history_titles: Sequence[str], candidate_titles: Sequence[str],
              retriever_scores: Sequence[float] | None = None) -> str:
        """The prompt text, ending exactly where the answer letter follows (see :meth:`build_with_ids`)."""
        return self.build_with_ids(history_titles, candidate_titles, retriever_scores)[0]

    def build_ids(self, history_titles: Sequence[str], candidate_titles: Sequence[str],
                  retriever_scores: Sequence[float] | None = None) -> list[int]:
        """The token ids of :meth:`build`'s prompt (``encode(tokenizer, prompt)``)."""
        return self.build_with_ids(history_titles, candidate_titles, retriever_scores)[1]

    def build_with_ids(self, history_titles: Sequence[str], candidate_titles: Sequence[str],
                       retriever_scores: Sequence[float] | None = None) -> tuple[str, list[int]]:
        """The prompt text and its token ids, tokenized once.

        ``history_titles`` is chronological (oldest first); only the last ``max_history`` are
        used, numbered from (1). If the prompt is longer than ``max_prompt_tokens`` the oldest
        history items are dropped one at a time, but the instruction, all candidates and the
        most recent history item are always kept; if even that is too long a
        :class:`LlamarecError` says so. ``retriever_scores`` (aligned with the candidates) are
        needed when ``candidate_item`` shows the retriever's rank or probability.
        """
        if not history_titles:
            raise LlamarecError("cannot build a ranking prompt for an empty history")
        if not 1 <= len(candidate_titles) <= len(LETTERS):
            raise LlamarecError(
                f"the candidate pool must hold 1 to {len(LETTERS)} items, "
                f"got {len(candidate_titles)}"
            )
        cfg = self.config
        history = [self.title(t) for t in history_titles[-cfg.max_history :]]
        shown = retriever_fields(retriever_scores, len(candidate_titles)) if cfg.shows_retriever else None
        candidates = cfg.separator.join(
            cfg.candidate_item.format(letter=letter, title=self.title(title), **(shown[j] if shown else {}))
            for j, (letter, title) in enumerate(zip(LETTERS, candidate_titles, strict=False))
        )
        for start in range(len(history)):
            text = self._render(history[start:], candidates)
            ids = encode(self.tokenizer, text)
            n_tokens = len(ids)
            if n_tokens <= cfg.max_prompt_tokens:
                return text, ids
        raise LlamarecError(
            f"the ranking prompt needs {n_tokens} tokens even with only the latest history "
            f"item, more than max_prompt_tokens={cfg.max_prompt_tokens}; raise max_prompt_tokens "
            f"or lower max_title_tokens (now {cfg.max_title_tokens})"
        )

    def training_example(
        self, history_titles: Sequence[str], candidate_titles: Sequence[str], answer: int,
        retriever_scores: Sequence[float] | None = None,
    ) -> TrainingExample:
        """The prompt followed by the letter of ``candidate_titles[answer]``, ready for training."""
        if not 0 <= answer < len(candidate_titles):
            raise LlamarecError(
                f"answer index {answer} is outside the candidate pool of {len(candidate_titles)}"
            )
        prompt, prompt_ids = self.build_with_ids(history_titles, candidate_titles, retriever_scores)
        letter_id = answer_token_id(self.tokenizer, prompt, LETTERS[answer])
        input_ids = prompt_ids + [letter_id]
        position = len(input_ids) - 1
        labels = [IGNORE_INDEX] * position + [letter_id]
        return TrainingExample(prompt + LETTERS[answer], input_ids, labels, position)

    def _render(self, history: list[str], candidates: str) -> str:
        cfg = self.config
        history_text = cfg.separator.join(
            cfg.history_item.format(index=i, title=title) for i, title in enumerate(history, 1)
        )
        text = cfg.template.format(
            instruction=cfg.instruction,
            input=cfg.input_template.format(history=history_text, candidates=candidates),
        )
        if cfg.use_chat_template:
            text = self._apply_chat_template(text)
        return text

    def _apply_chat_template(self, text: str) -> str:
        tok = self.tokenizer
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        # Chat templates often write the BOS token themselves; encode() adds it again when the
        # tokenizer adds special tokens, so drop the template's copy to avoid a double BOS.
        bos = tok.bos_token
        if bos and rendered.startswith(bos) and encode(tok, "")[:1] == [tok.bos_token_id]:
            rendered = rendered[len(bos) :]
        return rendered


def _special_token_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Strings the tokenizer would read as special (control) tokens inside plain text."""
    specials = set(tokenizer.all_special_tokens)
    specials.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return sorted(specials)
