"""Turning a record into the model's prompt. Shared content (image, caption or context) comes first and
the options last, so that shifted option mappings share a prefix (mapping-shift inference)."""

from __future__ import annotations

from ..data.records import Record

#: bump when the prompt layout changes: cached teacher outputs are keyed by it
PROMPT_VERSION = 1
ANSWER_CUE = "Answer:"


def shared_text(record: Record) -> str:
    """The part of the prompt that does not depend on the option order."""
    if record.task == "hallucination":
        return f"Caption: {record.system1_answer}\n{record.system2_question}"
    return f"Context: {record.context}\nClaim: {record.claim}\n{record.question}"


def options_text(options: list[str], letters: list[str]) -> str:
    return "\n".join(f"{letter}: {text}" for letter, text in zip(letters, options))


def user_text(record: Record, options: list[str] | None = None) -> str:
    """Prompt text after the image: shared part, then options, then the instruction."""
    opts = record.options if options is None else options
    letters = record.letters[: len(opts)]
    return f"{shared_text(record)}\n{options_text(opts, letters)}\nAnswer with the option's letter."


def build_prompt(processor, record: Record, options: list[str] | None = None) -> str:
    """The full prompt string, through the processor's chat template when it has one; it ends where
    the answer letter is expected."""
    text = user_text(record, options)
    template = getattr(processor, "chat_template", None)
    if template:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True) + f"{ANSWER_CUE}"
    image_token = getattr(processor, "image_token", "<image>")
    return f"{image_token}\n{text}\n{ANSWER_CUE}"
