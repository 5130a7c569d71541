"""How far is a base from the tasks when labels are unlimited? Tune a model on the task itself with a fresh
record every draw (the benchmark's generator at its level, seeds disjoint from any split's), and report
held-out accuracy on 256 fresh records every ``--eval-every`` steps. A model that stays at chance here
will not learn from the benchmark's 4,000 training records either; one that learns here shows how many
labelled examples the base needs. A diagnostic, not a training recipe: the shipped recipes train on the
benchmark's own splits.

usage: python scripts/task_probe.py --model zoo:tiny-llava-s --task hallucination [--steps 3000] [--lr 1e-3]
"""

import argparse
import random
import re
import time

import torch

from hkd4vlm.models.loading import freeze_vision_tower, load_model
from hkd4vlm.models.scoring import answer_distribution
from hkd4vlm.synth import factuality, hallucination
from hkd4vlm.synth.levels import LEVELS
from hkd4vlm.synth.scene import render

p = argparse.ArgumentParser()
p.add_argument("--model", default="zoo:tiny-llava-s")
p.add_argument("--task", default="hallucination", choices=["hallucination", "factuality"])
p.add_argument("--level", default="medium")
p.add_argument("--steps", type=int, default=3000)
p.add_argument("--bs", type=int, default=32)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--warmup", type=int, default=100)
p.add_argument("--eval-every", type=int, default=250)
p.add_argument("--train-vision", action="store_true")
p.add_argument("--pool", type=int, default=0, help="draw from a fixed pool of this many records (0: fresh every draw)")
p.add_argument(
    "--claim-after", action="store_true", help="factuality: repeat the claim after the image, before the options"
)
p.add_argument("--bench", default="", help="train on this dataset root's train split instead (no augmentation)")
p.add_argument(
    "--colour-in-claim",
    action="store_true",
    help="factuality, the reading rung: the claim also names the shape's colour and only the verdicts the text "
    "decides are drawn (true, contradicted by the context, not enough information; chance 1/3), so that the "
    "image is not needed",
)
a = p.parse_args()
torch.manual_seed(0)
level = LEVELS[a.level]
maker, kinds = (
    (hallucination.make_record, hallucination.HALLUCINATION_TYPES)
    if a.task == "hallucination"
    else (factuality.make_record, factuality.VERDICT_KEYS)
)
if a.colour_in_claim:
    kinds = ("true", "context", "nei")


def _colour_claim(record, scene):
    """The claim with the claimed shape's colour named ("Aiko drew the red circle.")."""
    size, shape, _ = factuality.parse_claim(record.claim)
    (obj,) = scene.find(shape=shape, size=size)
    record.claim = re.sub(rf"\b{shape}\b", f"{obj.colour} {shape}", record.claim, count=1)
    return record


def item(key: str):
    rng = random.Random(key)
    record, scene = maker(rng, level, "probe.jpg", rng.choice(kinds), rng.randrange(4))
    if a.colour_in_claim:
        record = _colour_claim(record, scene)
    return record, render(scene, level).convert("RGB")


def batch(keys):
    items = [item(k) for k in keys]
    return [r for r, _ in items], [im for _, im in items]


if a.claim_after:
    from hkd4vlm.models import prompt as _prompt
    from hkd4vlm.models import scoring as _scoring

    _orig, _instruction = _prompt.prompt_with_option_ends, _prompt.INSTRUCTION

    def _with_claim(processor, record, options=None):
        _prompt.INSTRUCTION = f"Claim: {record.claim}\n{_instruction}"
        try:
            return _orig(processor, record, options)
        finally:
            _prompt.INSTRUCTION = _instruction

    _scoring.prompt_with_option_ends = _with_claim
model, processor = load_model(a.model)
if not a.train_vision:
    freeze_vision_tower(model)
params = [q for q in model.parameters() if q.requires_grad]
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / a.warmup))
held = batch([f"probe-eval:{a.task}:{i}" for i in range(256)])


def evaluate() -> float:
    model.eval()
    hits = 0
    with torch.no_grad():
        for k in range(0, 256, 64):
            recs, ims = held[0][k : k + 64], held[1][k : k + 64]
            probs = answer_distribution(model, processor, recs, ims).probs
            hits += sum(int(pr.argmax()) == r.label for pr, r in zip(probs, recs))
    model.train()
    return hits / 256


if a.bench:
    from hkd4vlm.engine.sources import RecordSource

    source = RecordSource(a.bench, [a.task], "train")
    order = source.order(0)
t0 = time.time()
print(f"step 0 held-out {evaluate():.3f}", flush=True)
losses = []
for step in range(1, a.steps + 1):
    if a.bench:
        idx = [order[(step * a.bs + j) % len(order)] for j in range(a.bs)]
        recs, ims = map(list, zip(*(source.get(i) for i in idx)))
    else:
        keys = [
            f"probe-train:{a.task}:{(step * a.bs + j) % a.pool if a.pool else step * a.bs + j}" for j in range(a.bs)
        ]
        recs, ims = batch(keys)
    probs = answer_distribution(model, processor, recs, ims).probs
    labels = torch.tensor([r.label for r in recs])
    loss = torch.nn.functional.nll_loss(torch.log(probs + 1e-9), labels)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    losses.append(loss.item())
    if step % a.eval_every == 0:
        print(
            f"step {step} loss {sum(losses) / len(losses):.3f} held-out {evaluate():.3f} ({time.time() - t0:.0f} s)",
            flush=True,
        )
        losses = []
