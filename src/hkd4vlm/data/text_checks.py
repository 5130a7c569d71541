"""What text a record may carry into a prompt: no tokenizer control tokens, and (where a limit is set) a
bounded length per field.

**Control tokens are refused, not read as plain text.** The prompt is one string that the processor
tokenizes (models.prompt); a tokenizer matches its special tokens anywhere in that string. A caption holding
``<image>`` therefore adds an image slot that has no image (the processor fails, and with it every record
batched alongside); ``<eos>``, ``<pad>`` or a chat-template marker (``<|im_end|>``, ``<end_of_utterance>``)
would be read as the end of the turn, padding or a new role: an injection into the judge's own prompt.
Reading such text as plain text would need an escape that changes the characters the model sees, so the
score would be of text the caller did not send. No genuine caption, claim or option contains these markers;
one that does is a bug or an attack, and its sender is best served by an error naming the field. The same
rule holds everywhere a record meets a model: ``validate`` and ``read_split`` (so training and ``predict``)
check :data:`DEFAULT_CONTROL_TOKENS`, which covers every family the project builds and the common
chat-template forms; ``Detector`` and the HTTP service check those plus the special tokens of the model's
own tokenizer (models.loading.special_tokens).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

#: special tokens of the families the project builds or loads (LLaVA / Qwen2 and Idefics3 tiny presets,
#: Llama / Mistral, Gemma / PaliGemma), checked when no model is at hand
DEFAULT_CONTROL_TOKENS: frozenset[str] = frozenset(
    {
        "<image>",
        "<video>",
        "<pad>",
        "<unk>",
        "<bos>",
        "<eos>",
        "<s>",
        "</s>",
        "<mask>",
        "<sep>",
        "<cls>",
        "<fake_token_around_image>",
        "<global-img>",
        "<end_of_utterance>",  # Idefics3 / SmolVLM
        "<start_of_turn>",
        "<end_of_turn>",
        "<start_of_image>",
        "<end_of_image>",
        "<image_soft_token>",  # Gemma
        "[INST]",
        "[/INST]",
        "[IMG]",
        "[IMG_BREAK]",
        "[IMG_END]",  # Mistral / Pixtral
    }
)
#: control tokens that come in numbered families: ChatML and Qwen markers (``<|im_start|>``,
#: ``<|vision_start|>``, ``<|endoftext|>``), Idefics3's image tiles, PaliGemma's locations and segments
CONTROL_PATTERNS = (r"<\|[^<>|\s]{1,64}\|>", r"<row_\d+_col_\d+>", r"<loc\d{4}>", r"<seg\d{3}>")


#: the most characters one text field of a dataset record may hold, and all its text fields together (the
#: service's own defaults are the same per field: serve --max-text-chars); without a bound one 34.5 k-character
#: caption took 11 s and 1.8 GB in predict. Token bounds need the model's tokenizer: infer.predict checks them
MAX_FIELD_CHARS = 8_000
MAX_RECORD_CHARS = 16_000


@lru_cache(maxsize=16)
def _matcher(tokens: frozenset[str]) -> re.Pattern:
    # longest first, so that a token that is a prefix of another does not hide it in the message
    literal = [re.escape(t) for t in sorted(tokens, key=len, reverse=True) if t]
    return re.compile("|".join([*literal, *CONTROL_PATTERNS]))


def find_control_token(text: str, tokens: Iterable[str] = DEFAULT_CONTROL_TOKENS) -> str | None:
    """The first control token in ``text`` (one of ``tokens``, or one of :data:`CONTROL_PATTERNS`), or None."""
    m = _matcher(tokens if isinstance(tokens, frozenset) else frozenset(tokens)).search(text)
    return m.group(0) if m else None


#: control characters (C0, DEL, C1) and the Unicode line and paragraph separators, except the tab: the prompt is
#: laid out in lines ("Caption: ...", "B: option", "Answer:"), so a line break inside a field would let the
#: text forge lines of the prompt (a new option, an answer), and the others are not text
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def find_control_char(text: str) -> tuple[int, str] | None:
    """(position, character) of the first control character or line break in ``text``, or None."""
    m = _CONTROL_CHARS.search(text)
    return (m.start(), m.group(0)) if m else None


_CHAR_NAMES = {0: "NUL", 10: "line feed", 13: "carriage return", 0x85: "next line", 0x2028: "line separator"}


def control_char_message(at: int, char: str) -> str:
    name = _CHAR_NAMES.get(ord(char), "control character")
    return (
        f"contains U+{ord(char):04X} ({name}, {char!r}) at character {at}; a text field is one "
        "line of plain text (line breaks would forge lines of the prompt), so replace it with a space"
    )


def text_problem(text: str, tokens: Iterable[str] = DEFAULT_CONTROL_TOKENS) -> str | None:
    """What makes ``text`` unfit for a prompt whatever its length, or None: a lone surrogate (JSON's
    ``"\\ud800"`` decodes to one; it is not Unicode text, and tokenizers refuse it), a control character
    or line break, or a control token."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (
            f"not valid Unicode: a lone surrogate {text[e.start]!r} at character {e.start} (a UTF-16 half "
            "without its pair)"
        )
    token = find_control_token(text, tokens)
    if token is not None:
        return control_token_message(token)
    found = find_control_char(text)
    return None if found is None else control_char_message(*found)


def control_token_message(token: str) -> str:
    return (
        f"contains {token!r}, a special token of the model's tokenizer; text with control tokens is refused "
        "rather than read as plain text (remove or reword it)"
    )


@dataclass(frozen=True)
class TextPolicy:
    """What one text field may hold: none of ``control_tokens`` (nor :data:`CONTROL_PATTERNS`), at most
    ``max_chars`` characters and ``max_tokens`` tokens (None: no limit; ``count_tokens`` counts them);
    and what one record's text fields may hold together: ``max_total_tokens`` (the model's work grows
    with the whole prompt: 26 options of 1,000 tokens each pass every per-field limit). The character
    limit is checked first, so that an oversized text is never tokenized."""

    control_tokens: frozenset[str] = DEFAULT_CONTROL_TOKENS
    max_chars: int | None = None
    max_tokens: int | None = None
    count_tokens: Callable[[str], int] | None = None
    max_total_tokens: int | None = None

    def __post_init__(self):
        for name in ("max_chars", "max_tokens", "max_total_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or None for no limit), got {value}")
        if (self.max_tokens is not None or self.max_total_tokens is not None) and self.count_tokens is None:
            raise ValueError("max_tokens and max_total_tokens need count_tokens (a tokenizer)")

    def problem(self, text: str) -> str | None:
        """What is wrong with ``text`` under this policy, or None."""
        if self.max_chars is not None and len(text) > self.max_chars:
            return f"{len(text):,} characters, over the limit of {self.max_chars:,}"
        problem = text_problem(text, self.control_tokens)
        if problem is not None:
            return problem
        if self.max_tokens is not None:
            assert self.count_tokens is not None  # __post_init__: max_tokens needs count_tokens
            n = self.count_tokens(text)
            if n > self.max_tokens:
                return f"{n:,} tokens, over the limit of {self.max_tokens:,}"
        return None

    def total_problem(self, fields: Iterable[tuple[str, str]]) -> tuple[str, str] | None:
        """(the field at which the texts' tokens, counted in order, pass ``max_total_tokens``, and what is wrong),
        or None."""
        if self.max_total_tokens is None:
            return None
        assert self.count_tokens is not None  # __post_init__: max_total_tokens needs count_tokens
        total = 0
        for name, text in fields:
            total += self.count_tokens(text)
            if total > self.max_total_tokens:
                return name, (
                    f"the request's text reaches {total:,} tokens with this field, over the limit of "
                    f"{self.max_total_tokens:,} for all text fields together"
                )
        return None
