"""The Python API: a trained judge behind two calls.

    from hkd4vlm import Detector

    det = Detector.from_pretrained("runs/quickstart/seed0/ppod_hkd/stage-2-tcrd-level2/model", shifts=4)
    r = det.detect_hallucination("photo.jpg", caption="A red circle and a blue square.",
                                 options=["red circle", "blue square", "green star", "yellow triangle"])
    r.option, r.letter, r.probabilities, r.agreement
    det.check_fact(image_bytes, claim="Tom drew the circle.", context="...")

Every call scores the record under ``shifts`` cyclic option→letter mappings (a number, or "all": one per
option, as infer.msei.parse_shifts reads it) with the shared prefix encoded once (infer.msei) and returns
the aggregated prediction with the shifts' agreement, which a caller can threshold to abstain. Images may
be a path, a PIL image or bytes. Bad input raises errors.InputError naming the field (``.field``)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from PIL import Image

from ..data.images import DEFAULT_MAX_PIXELS, open_image
from ..data.records import LETTERS, Choice, Record
from ..data.tasks import FACT_QUESTIONS, SYSTEM1_QUESTIONS, SYSTEM2_QUESTIONS, TASKS, VERDICTS
from ..data.text_checks import DEFAULT_CONTROL_TOKENS, TextPolicy
from ..errors import InputError, ModelError, NonFiniteError
from .msei import AGGREGATES, DEFAULT_SHIFTS, Aggregate, MappingSpec, Shifts, parse_shifts, score_shifts

#: what a request may carry: at least two options, at most one per letter
MIN_OPTIONS, MAX_OPTIONS = 2, len(LETTERS)
DEFAULT_HALLUCINATION_QUESTION = SYSTEM2_QUESTIONS[0]
DEFAULT_FACT_QUESTION = FACT_QUESTIONS[0]
#: the four verdicts of the factuality task, the default choices of check_fact
DEFAULT_VERDICTS: tuple[str, ...] = tuple(VERDICTS)

ImageInput = str | os.PathLike | bytes | bytearray | Image.Image
#: the module functions' text check when no model is at hand: no control tokens, no length limit
DEFAULT_TEXT_POLICY = TextPolicy()


@dataclass
class Detection:
    """One judged record: the predicted option and the evidence for it."""

    task: str
    index: int  # of the predicted option, in the order given
    letter: str  # the letter that option has in the unshifted prompt (A, B, ...)
    option: str
    probabilities: list[float]  # per option, in the order given
    agreement: float  # share of the shifts whose own top option is the prediction
    votes: int
    shifts: int  # how many option→letter mappings were scored
    per_shift: list[list[float]] = field(default_factory=list)  # each mapping's probabilities, per option

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_text(value: Any, name: str, *, allow_empty: bool = False, policy: TextPolicy = DEFAULT_TEXT_POLICY) -> str:
    if not isinstance(value, str):
        raise InputError(f"field '{name}': must be a string, got {type(value).__name__}", field=name)
    if not allow_empty and not value.strip():
        raise InputError(f"field '{name}': empty", field=name)
    problem = policy.problem(value)  # control tokens and length limits (data.text_checks says why)
    if problem is not None:
        raise InputError(f"field '{name}': {problem}", field=name)
    return value


def _check_total(policy: TextPolicy, fields: list[tuple[str, str]]) -> None:
    problem = policy.total_problem(fields)
    if problem is not None:
        raise InputError(f"field '{problem[0]}': {problem[1]}", field=problem[0])


def _check_options(options: Any, name: str, policy: TextPolicy = DEFAULT_TEXT_POLICY) -> list[str]:
    if isinstance(options, (str, bytes)) or not isinstance(options, Sequence):
        raise InputError(f"field '{name}': must be a list of strings", field=name)
    if not MIN_OPTIONS <= len(options) <= MAX_OPTIONS:
        raise InputError(
            f"field '{name}': needs {MIN_OPTIONS} to {MAX_OPTIONS} options, got {len(options)}", field=name
        )
    out = [_check_text(o, f"{name}[{i}]", policy=policy) for i, o in enumerate(options)]
    if len(set(o.strip() for o in out)) != len(out):
        raise InputError(f"field '{name}': options must be distinct", field=name)
    return out


def load_image_input(
    image: ImageInput, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None, name: str = "image"
) -> Image.Image:
    """An RGB image from a path, bytes or a PIL image, scaled down to ``max_side`` when longer (None: as it is);
    InputError naming the field (and the file, for a path) when it is not one."""
    if not isinstance(image, (str, os.PathLike, bytes, bytearray, Image.Image)):
        raise InputError(
            f"field '{name}': must be a path, bytes or a PIL image, got {type(image).__name__}", field=name
        )
    try:
        source = Path(image) if isinstance(image, (str, os.PathLike)) else image
        return open_image(source, max_pixels=max_pixels, max_side=max_side)
    except ValueError as e:  # data.images.ImageProblem names the file
        raise InputError(f"field '{name}': {e}", field=name, file=getattr(e, "file", None)) from None


def hallucination_record(
    caption: str, options: Sequence[str], question: str | None = None, *, policy: TextPolicy = DEFAULT_TEXT_POLICY
) -> Record:
    caption = _check_text(caption, "caption", policy=policy)
    opts = _check_options(options, "options", policy)
    question = DEFAULT_HALLUCINATION_QUESTION if question is None else _check_text(question, "question", policy=policy)
    _check_total(
        policy, [("caption", caption), ("question", question)] + [(f"options[{i}]", o) for i, o in enumerate(opts)]
    )
    return Record(
        task="hallucination",
        image_id="<request>",
        choices=[Choice(LETTERS[i], o) for i, o in enumerate(opts)],
        system1_question=SYSTEM1_QUESTIONS[0],
        system1_answer=caption,
        system2_question=question,
    )


def fact_record(
    claim: str,
    context: str,
    choices: Sequence[str] | None = None,
    question: str | None = None,
    *,
    policy: TextPolicy = DEFAULT_TEXT_POLICY,
) -> Record:
    claim = _check_text(claim, "claim", policy=policy)
    context = _check_text(context, "context", allow_empty=True, policy=policy)
    opts = _check_options(DEFAULT_VERDICTS if choices is None else choices, "choices", policy)
    question = DEFAULT_FACT_QUESTION if question is None else _check_text(question, "question", policy=policy)
    _check_total(
        policy,
        [("claim", claim), ("context", context), ("question", question)]
        + [(f"choices[{i}]", o) for i, o in enumerate(opts)],
    )
    return Record(
        task="factuality",
        image_id="<request>",
        choices=[Choice(LETTERS[i], o) for i, o in enumerate(opts)],
        context=context,
        claim=claim,
        question=question,
    )


#: per task: the fields a request may carry (besides ``task``), and those it must carry
REQUEST_FIELDS = {
    "hallucination": ("image", "caption", "options", "question"),
    "factuality": ("image", "claim", "context", "choices", "question"),
}
REQUIRED_FIELDS = {"hallucination": ("image", "caption", "options"), "factuality": ("image", "claim", "context")}


def record_from_fields(task: str, fields: Mapping[str, Any], *, policy: TextPolicy = DEFAULT_TEXT_POLICY) -> Record:
    """A Record from one task's request fields (``REQUEST_FIELDS``); the image is only checked to be there.
    InputError names the first unknown or missing field, or the bad one (``policy``: what text may hold)."""
    unknown = [k for k in fields if k not in REQUEST_FIELDS[task]]
    if unknown:
        raise InputError(
            f"field '{unknown[0]}': unknown for {task} (unknown: {', '.join(map(repr, unknown))}; "
            f"expected {', '.join(REQUEST_FIELDS[task])})",
            field=unknown[0],
        )
    for name in REQUIRED_FIELDS[task]:
        if name not in fields:
            raise InputError(f"field '{name}': missing", field=name)
    if task == "hallucination":
        return hallucination_record(fields["caption"], fields["options"], fields.get("question"), policy=policy)
    return fact_record(fields["claim"], fields["context"], fields.get("choices"), fields.get("question"), policy=policy)


def request_record(item: Mapping[str, Any], *, policy: TextPolicy = DEFAULT_TEXT_POLICY) -> Record:
    """A Record from a request dict: ``task`` "hallucination" (image, caption, options, question?) or
    "factuality" (image, claim, context, choices?, question?)."""
    task = item.get("task")
    if task not in REQUEST_FIELDS:
        raise InputError(f"field 'task': must be {' or '.join(map(repr, TASKS))}, got {task!r}", field="task")
    return record_from_fields(task, {k: v for k, v in item.items() if k != "task"}, policy=policy)


def record_text_fields(record: Record) -> list[tuple[str, str]]:
    """(field name, text) of every text of ``record`` that its prompt shows, under the record's own names."""
    names = {"hallucination": ("system1_answer", "system2_question"), "factuality": ("context", "claim", "question")}
    fields = [(name, getattr(record, name)) for name in names.get(record.task, ())]
    return fields + [(f"choices[{j}].choice", c.choice) for j, c in enumerate(record.choices)]


def check_record_text(record: Record, policy: TextPolicy) -> None:
    """InputError naming the first field of a built record whose text ``policy`` refuses."""
    for name, text in record_text_fields(record):
        problem = policy.problem(text) if isinstance(text, str) else None
        if problem is not None:
            raise InputError(f"field '{name}': {problem}", field=name)
    _check_total(policy, record_text_fields(record))


class Detector:
    """A judge model with mapping-shift inference. Not thread-safe: call it from one thread at a time.

    Text holding a control token of the model's tokenizer (``<image>``, ``<eos>``, a chat-template marker)
    is refused with InputError naming the field (data.text_checks says why); ``max_text_chars`` and
    ``max_text_tokens`` bound each text field, ``max_request_tokens`` all of a record's text fields together
    (None: no bound)."""

    def __init__(
        self,
        model,
        processor,
        *,
        shifts: Shifts | str | None = DEFAULT_SHIFTS,
        aggregate: str = "logmean",
        name: str = "model",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        prefix_reuse: bool = True,
        max_text_chars: int | None = None,
        max_text_tokens: int | None = None,
        max_request_tokens: int | None = None,
    ):
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        shifts = parse_shifts(shifts)
        from ..models.scoring import check_readout

        try:  # here, not at the first request: a readout that cannot work would fail every one
            check_readout(model, processor)
        except ValueError as e:
            raise ModelError(f"{name}: {e}") from None
        self.model, self.processor = model, processor
        self.model.eval()
        self.spec = MappingSpec(shifts)
        self.shifts, self.name = shifts, name
        self.aggregate = cast(Aggregate, aggregate)  # checked above
        self.max_pixels, self.prefix_reuse = max_pixels, prefix_reuse
        self._token_counter: Callable[[str], int] | None = None
        self.text_policy = self.text_policy_with(max_text_chars, max_text_tokens, max_request_tokens)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        shifts: Shifts | str | None = DEFAULT_SHIFTS,
        *,
        device: str | None = None,
        dtype: str | torch.dtype = "auto",
        aggregate: str = "logmean",
        **kwargs,
    ) -> Detector:
        """A detector from a model folder, ``zoo:NAME`` or Hub id (anything ``models.loading.load_model`` reads)."""
        from ..models.loading import load_model

        model, processor = load_model(path, dtype=dtype, device=device)
        if not Path(path).is_dir():  # zoo:NAME, org/name: the name itself
            name = str(path)
        else:
            path = Path(path).resolve()
            name = f"{path.parent.name}/{path.name}" if path.name == "model" else path.name  # run folders end in model/
        return cls(model, processor, shifts=shifts, aggregate=aggregate, name=name, **kwargs)

    @property
    def num_parameters(self) -> int:
        from ..models.loading import count_parameters

        return count_parameters(self.model)

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "params": self.num_parameters,
            "shifts": self.shifts,
            "aggregate": self.aggregate,
            "model_type": getattr(self.model.config, "model_type", None),
            "device": str(next(self.model.parameters()).device),
        }

    def text_policy_with(
        self, max_chars: int | None, max_tokens: int | None, max_total_tokens: int | None = None
    ) -> TextPolicy:
        """What a text field may hold for this model: none of its tokenizer's control tokens, and the limits."""
        from ..models.loading import special_tokens

        return TextPolicy(
            control_tokens=DEFAULT_CONTROL_TOKENS | special_tokens(self.processor),
            max_chars=max_chars,
            max_tokens=max_tokens,
            count_tokens=self.count_tokens,
            max_total_tokens=max_total_tokens,
        )

    def count_tokens(self, text: str) -> int:
        """How many tokens ``text`` is to this model's tokenizer (no special tokens added, nothing truncated).

        Counted on a private copy of the tokenizer: the service counts on its event loop while the model
        thread tokenizes batches, and a fast tokenizer shared between threads fails ("Already borrowed")
        when one of them sets its padding or truncation."""
        if self._token_counter is None:
            tokenizer = getattr(self.processor, "tokenizer", self.processor)
            backend = getattr(tokenizer, "backend_tokenizer", None)
            if backend is not None:
                from tokenizers import Tokenizer

                counter = Tokenizer.from_str(backend.to_str())
                counter.no_truncation()
                counter.no_padding()
                self._token_counter = lambda t: len(counter.encode(t, add_special_tokens=False).ids)
            else:  # a slow (Python) tokenizer
                import copy

                private = copy.deepcopy(tokenizer)
                self._token_counter = lambda t: len(private.encode(t, add_special_tokens=False, truncation=False))
        return self._token_counter(text)

    # -- single records ------------------------------------------------------------------------------
    def detect_hallucination(
        self, image: ImageInput, caption: str, options: Sequence[str], *, question: str | None = None
    ) -> Detection:
        """Which option is not supported by the image, given the AI-written caption."""
        record = hallucination_record(caption, options, question, policy=self.text_policy)
        return self._score([record], [self._image(image)])[0]

    def check_fact(
        self,
        image: ImageInput,
        claim: str,
        context: str,
        choices: Sequence[str] | None = None,
        *,
        question: str | None = None,
    ) -> Detection:
        """Which verdict holds for the claim, given the image and the context (the four verdicts by default)."""
        record = fact_record(claim, context, choices, question, policy=self.text_policy)
        return self._score([record], [self._image(image)])[0]

    # -- batches -------------------------------------------------------------------------------------
    def predict(
        self,
        records: Iterable[Mapping[str, Any] | tuple[Record, ImageInput]],
        batch_size: int = 16,
        *,
        progress: bool = True,
    ) -> list[Detection]:
        """Judge many records, ``batch_size`` at a time. Each item is a request dict (``task``, ``image`` and the
        task's fields, as in :func:`request_record`) or a ``(Record, image)`` pair."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer of at least 1, got {batch_size!r}")
        if isinstance(records, (str, bytes, Mapping, Record)) or not isinstance(records, Iterable):
            raise InputError(
                f"records: must be a list of request dicts or (Record, image) pairs, got {type(records).__name__}"
                + (" (wrap one record in a list)" if isinstance(records, (Mapping, Record)) else ""),
                field="records",
            )
        items = list(records)
        prepared: list[tuple[Record, Image.Image]] = []
        for i, item in enumerate(items):
            try:
                if isinstance(item, tuple):
                    if len(item) != 2 or not isinstance(item[0], Record):
                        raise InputError(
                            f"a tuple must be a (Record, image) pair, got a tuple of {len(item)}"
                            + ("" if len(item) != 2 else f" starting with {type(item[0]).__name__}"),
                            field="-",
                        )
                    record, image = item
                    check_record_text(record, self.text_policy)
                elif isinstance(item, Mapping):
                    record, image = request_record(item, policy=self.text_policy), item["image"]
                else:
                    raise InputError(
                        f"must be a request dict or a (Record, image) pair, got {type(item).__name__}", field="-"
                    )
                prepared.append((record, self._image(image)))
            except InputError as e:
                raise e.in_record(i) from None
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(prepared), desc="detect", unit="rec")
        out: list[Detection] = []
        for start in range(0, len(prepared), batch_size):
            chunk = prepared[start : start + batch_size]
            out += self._score([r for r, _ in chunk], [im for _, im in chunk], first=start)
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        return out

    def score_records(self, records: list[Record], images: list[Image.Image]) -> list[Detection]:
        """Detections for already built records and loaded images (one batched call); InputError when a
        record's text holds one of the model's control tokens."""
        for i, record in enumerate(records):
            try:
                check_record_text(record, self.text_policy)
            except InputError as e:
                raise e.in_record(i) from None
        return self._score(records, images)

    # -- internals -----------------------------------------------------------------------------------
    def _image(self, image: ImageInput) -> Image.Image:
        return load_image_input(image, max_pixels=self.max_pixels)

    def _score(self, records: list[Record], images: list[Image.Image], *, first: int = 0) -> list[Detection]:
        """Detections of a batch (``first``: the index of its first record among the caller's, for messages)."""
        with torch.inference_mode():
            res = score_shifts(
                self.model,
                self.processor,
                records,
                images,
                spec=self.spec,
                how=self.aggregate,
                prefix_reuse=self.prefix_reuse,
            )
        out = []
        for i, r in enumerate(records):
            n = len(r.choices)
            if not (bool(torch.isfinite(res.probs[i, :n]).all()) and math.isfinite(float(res.agreement[i]))):
                raise NonFiniteError(
                    f"model {self.name}: non-finite probabilities {res.probs[i, :n].tolist()} for record #{first + i} "
                    "(its logits overflow or hold NaN); no answer can be given"
                )
            w = int(res.winner[i])
            out.append(
                Detection(
                    task=r.task,
                    index=w,
                    letter=r.letters[w],
                    option=r.options[w],
                    probabilities=[float(p) for p in res.probs[i, :n]],
                    agreement=float(res.agreement[i]),
                    votes=int(res.votes[i]),
                    shifts=len(res.mappings[i]),
                    per_shift=res.per_shift[i].tolist(),
                )
            )
        return out
