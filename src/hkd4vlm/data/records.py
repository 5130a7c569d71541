"""Typed records for both tasks, with the challenge's own field names (README and docs/data.md, "Data layout").

A record is parsed from the JSON the challenge ships; every problem found is reported as a
:class:`Problem` naming the file, the record and the field, so that nothing is dropped or changed
silently. Unknown fields are kept in ``extra`` and written back unchanged.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from .tasks import Task
from .text_checks import MAX_FIELD_CHARS, MAX_RECORD_CHARS, control_char_message, find_control_char, text_problem

#: folder name of each task under a dataset root, as the challenge ships it
TASK_DIRS: dict[Task, str] = {"hallucination": "HallucinationDetection", "factuality": "FactChecking"}
LETTERS = string.ascii_uppercase

#: fields every record of a task must have (besides ``choices``), all strings
REQUIRED_TEXT_FIELDS: dict[str, tuple[str, ...]] = {
    "hallucination": ("image_id", "system1_question", "system1_answer", "system2_question"),
    "factuality": ("image_id", "context", "claim", "question"),
}
LABEL_FIELDS = ("correct_answer", "correct_choice")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset: where it is and what would fix it."""

    file: str
    record: str  # the record's image_id, or "#<index>" when it has none; "-" for the whole file
    field: str  # "-" for the whole record or file
    message: str

    def __str__(self) -> str:
        # one line per problem whatever the data holds: a line break in an image_id must not forge a line
        return _one_line(f"{self.file}: record {self.record}: field '{self.field}': {self.message}")


def _one_line(text: str) -> str:
    return (
        text
        if find_control_char(text) is None
        else "".join(c.encode("unicode_escape").decode("ascii") if find_control_char(c) else c for c in text)
    )


class DatasetError(UserError, ValueError):
    """Raised when data is invalid; carries every problem found, one line each."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        lines = [str(p) for p in self.problems[:50]]
        if len(self.problems) > 50:
            lines.append(f"... and {len(self.problems) - 50} more problems")
        super().__init__(f"{len(self.problems)} problem(s) in the data:\n" + "\n".join(lines))

    def __reduce__(self):  # pickled as its problems (a DataLoader worker hands it to the training process)
        return type(self), (self.problems,)


@dataclass(frozen=True)
class Choice:
    id: str
    choice: str


@dataclass
class Record:
    """A record of either task. ``task`` decides which text fields are meaningful."""

    task: Task
    image_id: str
    choices: list[Choice]
    correct_answer: str | None = None
    correct_choice: str | None = None
    # hallucination detection
    system1_question: str = ""
    system1_answer: str = ""
    system2_question: str = ""
    # fact checking
    context: str = ""
    claim: str = ""
    question: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def options(self) -> list[str]:
        return [c.choice for c in self.choices]

    @property
    def letters(self) -> list[str]:
        return [c.id for c in self.choices]

    @property
    def label(self) -> int | None:
        """Index of the correct option, or None when the record is unlabelled."""
        if self.correct_choice is None:
            return None
        return self.letters.index(self.correct_choice)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"image_id": self.image_id}
        for name in REQUIRED_TEXT_FIELDS[self.task][1:]:
            out[name] = getattr(self, name)
        out["choices"] = [{"id": c.id, "choice": c.choice} for c in self.choices]
        if self.correct_choice is not None:
            out["correct_answer"] = self.correct_answer
            out["correct_choice"] = self.correct_choice
        out.update(self.extra)
        return out


def record_key(raw: Any, index: int) -> str:
    """How a record is named in messages: its image_id when it has a usable one, else its index."""
    if isinstance(raw, dict) and isinstance(raw.get("image_id"), str) and raw["image_id"].strip():
        return raw["image_id"]
    return f"#{index}"


def check_record(raw: Any, task: Task, *, file: str, index: int, labelled: bool | None = None) -> list[Problem]:
    """Every problem of one raw record (schema, label consistency, and no tokenizer control tokens or lone
    surrogates in the text the model reads: data.text_checks; images are checked elsewhere).

    ``labelled``: True requires the ``correct_*`` fields, False forbids nothing, None requires
    them only when one of the two is present (test files may lack both).
    """
    key = record_key(raw, index)

    def problem(fld: str, msg: str) -> Problem:
        return Problem(file, key, fld, msg)

    if not isinstance(raw, dict):
        return [problem("-", f"a record must be a JSON object, got {type(raw).__name__}")]
    problems: list[Problem] = []
    for name in REQUIRED_TEXT_FIELDS[task]:
        if name not in raw:
            problems.append(problem(name, "missing"))
        elif not isinstance(raw[name], str):
            problems.append(problem(name, f"must be a string, got {type(raw[name]).__name__}"))
        elif name == "image_id" and not raw[name].strip():
            problems.append(problem(name, "empty"))
        elif name == "image_id" and (found := find_control_char(raw[name])) is not None:
            problems.append(problem(name, control_char_message(*found)))
        elif name != "image_id" and (why := text_problem(raw[name])) is not None:
            problems.append(problem(name, why))  # control tokens, lone surrogates: data.text_checks says why

    ids: list[str] = []
    texts: dict[str, str] = {}
    choice_texts: list[tuple[str, str]] = []
    choices = raw.get("choices")
    if choices is None:
        problems.append(problem("choices", "missing"))
    elif not isinstance(choices, list) or not choices:
        problems.append(problem("choices", 'must be a non-empty list of {"id": letter, "choice": text}'))
    else:
        if len(choices) < 2:
            problems.append(problem("choices", f"needs at least 2 options, got {len(choices)}"))
        for j, c in enumerate(choices):
            where = f"choices[{j}]"
            if not isinstance(c, dict) or not {"id", "choice"} <= set(c):
                problems.append(problem(where, 'must be an object {"id": letter, "choice": text}'))
                continue
            cid, text = c["id"], c["choice"]
            if not isinstance(cid, str) or len(cid) != 1 or cid not in LETTERS:
                problems.append(problem(f"{where}.id", f"must be one capital letter A-Z, got {cid!r}"))
                continue
            if cid in ids:
                problems.append(problem(f"{where}.id", f"duplicate id {cid!r}"))
                continue
            if not isinstance(text, str) or not text.strip():
                problems.append(problem(f"{where}.choice", "must be a non-empty string"))
                continue
            if (why := text_problem(text)) is not None:
                problems.append(problem(f"{where}.choice", why))
            same = next((k for k, (_, t) in enumerate(choice_texts) if t.strip() == text.strip()), None)
            if same is not None:  # the Detector and the service refuse this too: the options must be told apart
                problems.append(problem(f"{where}.choice", f"the same text as {choice_texts[same][0]}: {text!r}"))
            ids.append(cid)
            texts[cid] = text
            choice_texts.append((f"{where}.choice", text))

    shown = [(n, raw[n]) for n in REQUIRED_TEXT_FIELDS[task][1:] if isinstance(raw.get(n), str)]
    shown += choice_texts
    for name, text in shown:
        if len(text) > MAX_FIELD_CHARS:
            problems.append(problem(name, f"{len(text):,} characters, over the limit of {MAX_FIELD_CHARS:,}"))
    total = sum(len(t) for _, t in shown)
    if total > MAX_RECORD_CHARS and all(len(t) <= MAX_FIELD_CHARS for _, t in shown):
        problems.append(
            problem("-", f"its text fields hold {total:,} characters together, over the limit of {MAX_RECORD_CHARS:,}")
        )

    if "synth" in raw:
        problems += [problem(f, m) for f, m in synth_problems(raw["synth"])]

    has_labels = any(name in raw for name in LABEL_FIELDS)
    if labelled or (labelled is None and has_labels):
        for name in LABEL_FIELDS:
            if name not in raw:
                problems.append(problem(name, "missing"))
            elif not isinstance(raw[name], str):
                problems.append(problem(name, f"must be a string, got {type(raw[name]).__name__}"))
        cc, ca = raw.get("correct_choice"), raw.get("correct_answer")
        if isinstance(cc, str) and ids and cc not in ids:
            problems.append(problem("correct_choice", f"{cc!r} is not among the choice ids {ids}"))
        elif isinstance(cc, str) and isinstance(ca, str) and cc in texts and _norm(ca) != _norm(texts[cc]):
            problems.append(problem("correct_answer", f"{ca!r} disagrees with the text of choice {cc}: {texts[cc]!r}"))
    return problems


def synth_problems(synth: Any) -> list[tuple[str, str]]:
    """(field, message) for what is wrong with a record's ``synth`` field, the synthetic benchmark's scene that
    geometric augmentations move along with the image (data.augment): an object whose ``scene`` is an object
    with a list of ``objects``, each with numbers ``x``, ``y``, ``r``."""
    if not isinstance(synth, dict):
        return [("synth", f"must be an object (the synthetic scene), got {type(synth).__name__}")]
    scene = synth.get("scene")
    if scene is None:
        return []
    if not isinstance(scene, dict) or not isinstance(scene.get("objects"), list):
        return [("synth.scene", 'must be an object with a list "objects"')]
    for k, o in enumerate(scene["objects"]):
        bad = [n for n in ("x", "y", "r") if not isinstance(o, dict) or not _is_number(o.get(n))]
        if bad:
            return [(f"synth.scene.objects[{k}]", f"must be an object with finite numbers x, y and r (bad: {bad})")]
    return []


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def parse_record(raw: dict[str, Any], task: Task) -> Record:
    """Build a :class:`Record` from a raw record that :func:`check_record` accepted."""
    known = set(REQUIRED_TEXT_FIELDS[task]) | {"choices", *LABEL_FIELDS}
    kwargs = {name: raw[name] for name in REQUIRED_TEXT_FIELDS[task]}
    return Record(
        task=task,
        choices=[Choice(c["id"], c["choice"]) for c in raw["choices"]],
        correct_answer=raw.get("correct_answer"),
        correct_choice=raw.get("correct_choice"),
        extra={k: v for k, v in raw.items() if k not in known},
        **kwargs,
    )
