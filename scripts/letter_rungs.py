"""Where does the letter readout stall? The text-only question "Which option is <colour>?" answered by
letter, climbing one rung at a time from a plain Qwen2 (which learns it) to the project's own path (which
did not, in 3,500 steps). Each rung adds one piece; the first rung that stays at chance is the one that
stalls it. AdamW lr 1e-3, weight decay 0.01, batch 64, tiny-llava-s's text sizes; held-out accuracy of
256 questions every 250 steps.

usage: python scripts/letter_rungs.py [--rungs 0,1,2,3,4] [--steps 2000]
  0  plain Qwen2, its own 21-word vocabulary, the probe's 25-token sequence
  1  plain Qwen2, the project's tokenizer and prompt text (no image line)
  2  as 1, plus 16 constant "<image>" tokens where the image goes (like 16 px patches)
  3  as 1, plus 64 constant "<image>" tokens (like 8 px patches, the presets' resolution)
  4  the project's model (LLaVA wrapper, tiny-llava-s) and answer_distribution, blank grey image
"""

import argparse
import random
import time

import torch
from PIL import Image
from transformers import Qwen2Config, Qwen2ForCausalLM

from hkd4vlm.data.records import Choice, Record
from hkd4vlm.models.prompt import build_prompt
from hkd4vlm.models.registry import build_tiny, get_preset
from hkd4vlm.models.scoring import answer_distribution, letter_token_ids, set_readout

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
p = argparse.ArgumentParser()
p.add_argument("--rungs", default="0,1,2,3,4")
p.add_argument("--steps", type=int, default=2000)
p.add_argument("--bs", type=int, default=64)
p.add_argument("--lr", type=float, default=1e-3)
a = p.parse_args()
S = get_preset("tiny-llava-s")


def question(rng):
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


def qwen(vocab):
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=S.text_hidden,
        intermediate_size=2 * S.text_hidden,
        num_hidden_layers=S.text_layers,
        num_attention_heads=S.heads,
        num_key_value_heads=S.heads,
        max_position_embeddings=1024,
    )
    return Qwen2ForCausalLM(cfg)


def rung_scorer(rung):
    """(model, score(records) -> (B, 4) letter logits)."""
    model, proc = build_tiny("tiny-llava-s", [f"Which option is {c}?" for c in COLOURS] + COLOURS, seed=0)
    tok = proc.tokenizer
    if rung == 4:
        set_readout(model, "letter")
        image = Image.new("RGB", (64, 64), (128, 128, 128))
        return model, lambda recs: answer_distribution(model, proc, recs, [image] * len(recs)).logits
    if rung == 0:
        words = ["<pad>", "Which", "option", "is", "?", "A", "B", "C", "D", ":", "Answer", "\n"] + COLOURS
        V = {w: i for i, w in enumerate(words)}
        m = qwen(len(words))

        def ids(r):
            s = [V["Which"], V["option"], V["is"], V[r.question.split()[-1][:-1]], V["?"]]
            for letter, o in zip(r.letters, r.options):
                s += [V["\n"], V[letter], V[":"], V[o]]
            return s + [V["\n"], V["Answer"], V[":"]]

        letters = [V[x] for x in "ABCD"]
    else:
        m = qwen(len(tok))
        filler = {1: 0, 2: 16, 3: 64}[rung]

        def ids(r):
            text = build_prompt(proc, r)
            text = text.replace("<image>", " ".join(["<image>"] * filler)) if filler else text.replace("\n<image>", "")
            return tok(text, add_special_tokens=False)["input_ids"]

        letters = letter_token_ids(tok, list("ABCD"))

    def score(recs):
        x = torch.tensor([ids(r) for r in recs])  # every question has the same length: no padding
        return m(input_ids=x, logits_to_keep=1).logits[:, -1, letters]

    return m, score


for rung in [int(r) for r in a.rungs.split(",")]:
    model, score = rung_scorer(rung)
    rng, held = random.Random(0), random.Random(99)
    test = [question(held) for _ in range(256)]
    yt = torch.tensor([r.label for r in test])
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    t0, curve = time.time(), []
    for step in range(1, a.steps + 1):
        recs = [question(rng) for _ in range(a.bs)]
        loss = torch.nn.functional.cross_entropy(score(recs), torch.tensor([r.label for r in recs]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0:
            model.eval()
            with torch.no_grad():
                acc = (score(test).argmax(-1) == yt).float().mean().item()
            model.train()
            curve.append(f"{step}:{acc:.2f}")
            if acc > 0.98:
                break
    print(f"rung {rung}: " + " ".join(curve) + f" ({time.time() - t0:.0f} s)", flush=True)
