"""Turning a record into the model's prompt. Shared content (text, image, the instruction) comes first and
the options last, so that shifted option mappings share everything up to the first option line
(mapping-shift inference encodes that prefix once, infer.msei).

What is asked comes before what is read (prompt version 4): the question and the claim before the
context (version 5: the question first, so that the claim ends where the context begins); the question
and the statements to check (the options' texts in the record's own order, without letters) before the
caption; all of the text before the image. (Pretraining questions keep their
version-3 layout, context first, until the zoo is rebuilt.) Under causal attention a token can only
use what came before it: a context read before the question must bind every name to its colour without
knowing which will be asked, a circuit tiny decoders did not form in the lab (docs/lab.md: the reading
rung learns with the question first and stays at chance with it last), and image tokens read after the
statements can check themselves against them. The lettered options come again after the image, for the
readout; their first listing does not change with the option order, so the shared prefix still does not."""

from __future__ import annotations

from ..data.records import Record

#: bump when the tasks' prompt layout changes: cached teacher outputs are keyed by it
PROMPT_VERSION = 5
#: the layout of the pretraining questions (synth.grounding), unchanged since version 3: pretraining runs
#: and the zoo's bases are keyed by it, so a new task layout does not make the shipped bases stale
GROUNDING_PROMPT_VERSION = 3
ANSWER_CUE = "Answer:"
INSTRUCTION = "Answer with the option's letter."


def shared_text(record: Record) -> str:
    """The part of the prompt that does not depend on the option order."""
    if record.task == "hallucination":
        statements = "\n".join(f"- {text}" for text in record.options)
        return f"{record.system2_question}\n{statements}\nCaption: {record.system1_answer}"
    if record.task == "grounding":  # pretraining questions (synth.grounding)
        return (f"Context: {record.context}\n" if record.context else "") + f"Question: {record.question}"
    # the question first: with it between the claim and the context (version 4) the project's VLM did not
    # learn to find the person the context credits (docs/pretraining.md, "The name hop in the project's form")
    return f"{record.question}\nClaim: {record.claim}\nContext: {record.context}"


def option_line(letter: str, text: str) -> str:
    return f"{letter}: {text}"


def options_text(options: list[str], letters: list[str]) -> str:
    return "\n".join(option_line(letter, text) for letter, text in zip(letters, options))


def choices_text(record: Record, options: list[str] | None = None) -> str:
    """Prompt text after the image: the instruction (the same for every option order), then the options by
    letter."""
    opts = record.options if options is None else options
    letters = record.letters[: len(opts)]
    return f"{INSTRUCTION}\n{options_text(opts, letters)}"


def build_prompt(processor, record: Record, options: list[str] | None = None) -> str:
    """The full prompt string (shared text, image, options), through the processor's chat template when
    it has one; it ends where the answer letter is expected."""
    return prompt_with_option_ends(processor, record, options)[0]


def prompt_with_option_ends(processor, record: Record, options: list[str] | None = None) -> tuple[str, list[int]]:
    """The prompt and, per option, the character offset just past the option's text in it (the option
    readout reads there, models.scoring); no offsets for open questions, which show no options."""
    prompt = _render(processor, record, options)
    if getattr(record, "open", False):
        return prompt, []
    opts = record.options if options is None else options
    tail = choices_text(record, opts)
    at = prompt.rfind(tail)
    if at < 0:  # a chat template that rewrites message text would break the offsets
        raise ValueError("the processor's chat template changed the options' text; the option readout cannot find them")
    ends, pos = [], at + len(INSTRUCTION) + 1
    for letter, text in zip(record.letters[: len(opts)], opts):
        pos += len(option_line(letter, text))
        ends.append(pos)
        pos += 1  # the newline between option lines
    return prompt, ends


def _render(processor, record: Record, options: list[str] | None) -> str:
    shared = shared_text(record)
    # open pretraining questions (synth.grounding) show no options: the answer is a word
    tail = "" if getattr(record, "open", False) else choices_text(record, options)
    template = getattr(processor, "chat_template", None)
    if template:
        content = [{"type": "text", "text": shared}, {"type": "image"}] + (
            [{"type": "text", "text": tail}] if tail else []
        )
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True) + f"{ANSWER_CUE}"
    image_token = getattr(processor, "image_token", "<image>")
    return f"{shared}\n{image_token}\n" + (f"{tail}\n" if tail else "") + ANSWER_CUE
