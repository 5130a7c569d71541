"""The two answer readouts (models.scoring): letter and option, on both tiny families. The option readout's
scores are checked against the verdict token's logit read by hand at each option's last token; batching
and padding do not change them; a checkpoint keeps its readout; and the option readout learns the
text-only "which option is <colour>?" question through the project's own model within a minute."""

import copy
import random

import pytest
import torch
from PIL import Image

from hkd4vlm.data.records import Choice, Record
from hkd4vlm.models.loading import load_model
from hkd4vlm.models.prompt import build_prompt
from hkd4vlm.models.registry import build_tiny, init_model
from hkd4vlm.models.scoring import (
    ReadoutError,
    answer_distribution,
    get_readout,
    letter_token_ids,
    set_readout,
    verdict_token_id,
)

FAMILIES = ["tiny-llava-s", "tiny-idefics3-s"]


@pytest.fixture(scope="module", params=FAMILIES)
def option_model(request, synth_root, tmp_path_factory, sharpen):
    path = init_model(request.param, synth_root, tmp_path_factory.mktemp("readout") / request.param, seed=1)
    model, processor = load_model(path)
    sharpen(model, 1)
    return path, model.eval(), processor


def _mixed(batch):
    records, images = batch
    records = [copy.deepcopy(r) for r in records]
    records[2].choices = records[2].choices[:3]  # a record with three options among four-option ones
    records[2].correct_choice = records[2].correct_answer = None
    return records, images


def test_tiny_presets_start_with_the_option_readout(option_model):
    _, model, _ = option_model
    assert get_readout(model).kind == "option"


def _verdict_at_option_ends(model, processor, record, image, vid):
    """By hand: the verdict token's logit at each lettered option's last token (after the image)."""
    tok = processor.tokenizer
    enc = processor(images=[image], text=[build_prompt(processor, record)], return_tensors="pt")
    out = model(**enc)
    ids = enc["input_ids"][0].tolist()
    want = []
    for k, option in enumerate(record.options):
        # the last "L" ":" pair of the option's letter, then the option's own tokens
        letter = letter_token_ids(tok, [record.letters[k]])[0]
        letter_at = max(j for j in range(len(ids) - 1) if ids[j] == letter and tok.decode([ids[j + 1]]).strip() == ":")
        option_ids = tok(f" {option}", add_special_tokens=False)["input_ids"]
        end = letter_at + 1 + len(option_ids)
        assert ids[letter_at + 2 : end + 1] == option_ids
        want.append(out.logits[0, end, vid])
    return torch.stack(want)


def test_option_scores_are_the_verdict_logit_at_each_option_end(option_model, batch):
    _, model, processor = option_model
    records, images = _mixed(batch)
    vid = verdict_token_id(processor.tokenizer, get_readout(model).verdict_token)
    with torch.inference_mode():
        scores = answer_distribution(model, processor, records, images)
        for b, (r, im) in enumerate(zip(records, images)):
            want = _verdict_at_option_ends(model, processor, r, im, vid)
            got = scores.logits[b, : len(r.options)]
            assert torch.allclose(got, want, atol=1e-4), (b, got, want)
            if len(r.options) < scores.logits.shape[1]:
                assert scores.probs[b, len(r.options) :].eq(0).all()
    assert torch.allclose(scores.probs.sum(-1), torch.ones(len(records)), atol=1e-5)
    assert scores.hidden.shape == (len(records), model.config.get_text_config().hidden_size)


def test_hallucination_answers_with_the_option_scored_least_likely_to_hold(option_model, synth_root):
    """One meaning for the option score ("this option holds") in every task: a question that asks for the
    option that does not hold reads the negated score, with or without mapping-shift inference."""
    from hkd4vlm.data.layout import read_split
    from hkd4vlm.infer.msei import score_shifts

    _, model, processor = option_model
    split = read_split(synth_root, "hallucination", "test")
    records = split.records[:3]
    images = [split.load_image(r) for r in records]
    vid = verdict_token_id(processor.tokenizer, get_readout(model).verdict_token)
    with torch.inference_mode():
        scores = answer_distribution(model, processor, records, images)
        for b, (r, im) in enumerate(zip(records, images)):
            holds = _verdict_at_option_ends(model, processor, r, im, vid)
            assert holds.std() > 1e-3  # the scores differ, so a missing sign would show
            assert torch.allclose(scores.logits[b], -holds, atol=1e-4)
            assert torch.allclose(scores.probs[b], torch.softmax(-holds, -1), atol=1e-5)
        one_pass = score_shifts(model, processor, records, images, spec=None)
        assert torch.allclose(one_pass.per_shift[0][0], scores.probs[0], atol=1e-4)


def test_option_readout_is_the_same_batched_and_alone(option_model, batch):
    _, model, processor = option_model
    records, images = _mixed(batch)
    with torch.inference_mode():
        together = answer_distribution(model, processor, records, images)
        for b, (r, im) in enumerate(zip(records, images)):
            alone = answer_distribution(model, processor, [r], [im])
            n = len(r.options)
            assert torch.allclose(together.probs[b, :n], alone.probs[0, :n], atol=1e-5)
            assert torch.allclose(together.hidden[b], alone.hidden[0], atol=1e-4)
    # the readout must depend on the options: swapping two options swaps their probabilities
    r = copy.deepcopy(records[0])
    r.choices = [
        Choice(r.choices[0].id, records[0].options[1]),
        Choice(r.choices[1].id, records[0].options[0]),
    ] + r.choices[2:]
    with torch.inference_mode():
        swapped = answer_distribution(model, processor, [r], images[:1]).probs[0]
    assert not torch.allclose(swapped, together.probs[0, :4], atol=1e-4)


def test_readout_round_trips_with_the_checkpoint(option_model, batch, tmp_path):
    path, model, processor = option_model
    records, images = batch
    set_readout(model, "letter")
    try:
        model.save_pretrained(tmp_path / "letter")
        processor.save_pretrained(tmp_path / "letter")
        with torch.inference_mode():
            letter = answer_distribution(model, processor, records, images)
    finally:
        set_readout(model, "option")
    again, proc = load_model(tmp_path / "letter")
    assert get_readout(again).kind == "letter"
    with torch.inference_mode():
        assert torch.allclose(answer_distribution(again.eval(), proc, records, images).probs, letter.probs, atol=1e-6)
        # the letter readout reads the letters' logits at the answer cue
        enc = processor(images=images[:1], text=[build_prompt(processor, records[0])], return_tensors="pt")
        last = again(**enc).logits[0, -1]
        ids = letter_token_ids(processor.tokenizer, records[0].letters)
        assert torch.allclose(letter.probs[0], torch.softmax(last[ids], -1), atol=1e-5)
    option_again, _ = load_model(path)
    assert get_readout(option_again).kind == "option"


def test_a_verdict_token_that_is_not_one_token_is_refused(option_model, batch):
    _, model, processor = option_model
    records, images = batch
    set_readout(model, "option", verdict_token="no-such-word-zzz")
    try:
        with pytest.raises(ReadoutError, match="verdict token"):
            answer_distribution(model, processor, records, images)
    finally:
        set_readout(model, "option", verdict_token="Yes")
    with pytest.raises(ReadoutError, match="unknown readout"):
        set_readout(model, "logits")


def test_option_readout_gets_gradients_into_the_verdict_row(option_model, batch):
    _, model, processor = option_model
    records, images = batch
    labels = torch.tensor([r.label for r in records])
    model.zero_grad()
    loss = torch.nn.functional.cross_entropy(answer_distribution(model, processor, records, images).logits, labels)
    loss.backward()
    head = model.get_output_embeddings().weight.grad
    vid = verdict_token_id(processor.tokenizer, get_readout(model).verdict_token)
    assert head[vid].abs().sum() > 0
    assert head.abs().sum() == head[vid].abs().sum()  # only the verdict token's row is read
    model.zero_grad()


def test_option_readout_gradients_do_not_depend_on_how_the_batch_is_split(option_model, batch):
    """What gradient accumulation and data parallelism rely on: the mean loss's gradient over one batch of
    four equals the mean of two batches of two (each padded to its own length)."""
    _, model, processor = option_model
    records, images = _mixed(batch)
    labels = torch.tensor([0, 1, 2, 3])

    def grads(chunks):
        model.zero_grad()
        for c in chunks:
            scores = answer_distribution(model, processor, [records[i] for i in c], [images[i] for i in c])
            (torch.nn.functional.cross_entropy(scores.logits, labels[list(c)]) / len(chunks)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole, split = grads([range(4)]), grads([range(2), range(2, 4)])
    model.zero_grad()
    assert whole.keys() == split.keys() and len(whole) > 10
    overall = max(g.abs().max().item() for g in whole.values())
    for name in whole:
        # relative to each tensor's own scale, plus float noise on gradients that are 0 in exact arithmetic
        # (a key bias cannot change attention: its gradient is round-off only)
        scale = whole[name].abs().max().item()
        assert (whole[name] - split[name]).abs().max().item() <= 1e-4 * scale + 1e-6 * overall, name


COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]


def _colour_question(rng: random.Random) -> Record:
    opts = rng.sample(COLOURS, 4)
    y = rng.randrange(4)
    return Record(
        task="factuality",
        image_id="x.png",
        choices=[Choice(letter, o) for letter, o in zip("ABCD", opts)],
        correct_answer=opts[y],
        correct_choice="ABCD"[y],
        context="",
        claim="",
        question=f"Which option is {opts[y]}?",
    )


@pytest.mark.slow
def test_option_readout_learns_the_text_only_probe_quickly():
    """Learnability guard: the option readout learns "which option is <colour>?" through the project's own
    tiny model and prompt in a few dozen steps (the letter readout needs thousands; docs/experiments.md).
    A change that breaks learning (scoring, prompt, positions) fails here."""
    torch.manual_seed(0)
    model, processor = build_tiny(
        "tiny-llava-s", [f"Which option is {c}?" for c in COLOURS] + COLOURS + ["Yes"], seed=0
    )
    set_readout(model, "option")
    image = Image.new("RGB", (64, 64), (128, 128, 128))
    rng, held = random.Random(0), random.Random(99)
    test = [_colour_question(held) for _ in range(128)]
    labels = torch.tensor([r.label for r in test])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)

    def accuracy() -> float:
        model.eval()
        with torch.inference_mode():
            acc = answer_distribution(model, processor, test, [image] * len(test)).probs.argmax(-1) == labels
        model.train()
        return acc.float().mean().item()

    assert accuracy() < 0.5  # untrained: near chance
    model.train()
    for step in range(1, 201):
        recs = [_colour_question(rng) for _ in range(32)]
        scores = answer_distribution(model, processor, recs, [image] * len(recs))
        loss = torch.nn.functional.cross_entropy(scores.logits, torch.tensor([r.label for r in recs]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 and accuracy() >= 0.95:
            break
    assert accuracy() >= 0.95, f"option readout did not learn the probe in {step} steps"
