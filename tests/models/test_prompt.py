"""The prompt's layout (version 5): what is asked comes before what is read, all text before the image,
the lettered options last; the part before the options does not change with their order."""

from hkd4vlm.data.layout import read_split
from hkd4vlm.models.prompt import INSTRUCTION, PROMPT_VERSION, build_prompt, prompt_with_option_ends
from hkd4vlm.models.registry import build_tiny, corpus


def _processor(root):
    return build_tiny("tiny-llava-s", corpus(root))[1]


def test_factuality_reads_the_question_and_claim_before_the_context_and_the_image(synth_root):
    processor = _processor(synth_root)
    r = read_split(synth_root, "factuality", "test").records[0]
    prompt = build_prompt(processor, r)
    at = [prompt.index(s) for s in (r.question, r.claim, r.context, "<image>", INSTRUCTION)]
    assert at == sorted(at), prompt
    assert f"Claim: {r.claim}\nContext: {r.context}" in prompt  # the claim ends where the context begins
    assert PROMPT_VERSION == 5


def test_hallucination_lists_the_statements_before_the_image_and_the_letters_after_it(synth_root):
    processor = _processor(synth_root)
    r = read_split(synth_root, "hallucination", "test").records[0]
    prompt, ends = prompt_with_option_ends(processor, r)
    image = prompt.index("<image>")
    head, tail = prompt[:image], prompt[image:]
    # the question, then each statement in the record's order without a letter, then the caption
    listed = [head.index(f"\n- {text}\n") for text in r.options]
    assert head.index(r.system2_question) < listed[0] and listed == sorted(listed)
    assert listed[-1] < head.index(f"Caption: {r.system1_answer}")
    assert not any(f"{c.id}: " in head for c in r.choices)
    # the readout reads each lettered option after the image
    for choice, end in zip(r.choices, ends):
        line = f"{choice.id}: {choice.choice}"
        assert end > image and prompt[end - len(line) : end] == line
    assert all(f"{c.id}: {c.choice}" in tail for c in r.choices)


def test_the_prefix_before_the_options_does_not_change_with_their_order(synth_root):
    processor = _processor(synth_root)
    for task in ("hallucination", "factuality"):
        r = read_split(synth_root, task, "test").records[1]
        shifted = r.options[1:] + r.options[:1]
        a, b = build_prompt(processor, r), build_prompt(processor, r, shifted)
        assert a != b
        cut = a.index(INSTRUCTION)
        assert a[:cut] == b[:cut]
