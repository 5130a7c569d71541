"""Can a base learn to verify one phrase against the image? Each draw is the verification stage's item
(synth.grounding.verify_item: a fresh scene and four statements of the task's kinds, each true or
false with probability 1/2; the numbers marked "probe version" in docs/experiments.md came from this script at commit 1d88e80,
which drew its own statements, count ones with a text shortcut); the loss is a binary cross-entropy on every option's verdict logit (four
signals per image instead of one four-way answer). Reports held-out per-phrase accuracy by kind, and the
hallucination task solved by the verifier (the option it scores least true) on fresh task records.

usage: python scripts/verify_probe.py --model zoo:tiny-llava-s [--steps 3000] [--lr 1e-3]
"""

import argparse
import random
import time

import torch

from hkd4vlm.models.loading import freeze_vision_tower, load_model
from hkd4vlm.models.scoring import answer_distribution
from hkd4vlm.synth import hallucination
from hkd4vlm.synth.grounding import VERIFY_QUESTION, GroundingQuestion, statement_kind, verify_item
from hkd4vlm.synth.levels import LEVELS
from hkd4vlm.synth.scene import render

QUESTION = VERIFY_QUESTION
p = argparse.ArgumentParser()
p.add_argument("--model", default="zoo:tiny-llava-s")
p.add_argument("--level", default="medium")
p.add_argument("--steps", type=int, default=3000)
p.add_argument("--bs", type=int, default=32)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--warmup", type=int, default=100)
p.add_argument("--eval-every", type=int, default=250)
p.add_argument("--kinds", default="exist,exist,relation,count")
p.add_argument("--save", default="")
a = p.parse_args()
torch.manual_seed(0)
level = LEVELS[a.level]
KINDS = tuple(a.kinds.split(","))


def item(key: str):
    scene, q = verify_item(key, level, kinds=KINDS)  # the library's statements (engine: the verification stage)
    return q, q.truths, [statement_kind(t) for t in q.options], render(scene, level).convert("RGB")


def batch(keys):
    items = [item(k) for k in keys]
    return tuple(list(x) for x in zip(*items))


model, processor = load_model(a.model)
freeze_vision_tower(model)
params = [q for q in model.parameters() if q.requires_grad]
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / a.warmup))
held = batch([f"verify-eval:{i}" for i in range(256)])
task_held = []
for i in range(256):
    rng = random.Random(f"verify-task:{i}")
    rec, scene = hallucination.make_record(
        rng, level, "t.jpg", rng.choice(hallucination.HALLUCINATION_TYPES), rng.randrange(4)
    )
    task_held.append(
        (GroundingQuestion(QUESTION, rec.options, rec.label, "task"), rec.label, render(scene, level).convert("RGB"))
    )


def scores(qs, ims):
    return answer_distribution(model, processor, qs, ims).logits


def evaluate() -> str:
    model.eval()
    hit, cnt = {}, {}
    task_hits = 0
    with torch.no_grad():
        for k in range(0, 256, 64):
            qs, truths, kinds, ims = (x[k : k + 64] for x in held)
            s = scores(qs, ims)
            for b in range(len(qs)):
                for j, (t, kd) in enumerate(zip(truths[b], kinds[b])):
                    hit[kd] = hit.get(kd, 0) + int((s[b, j].item() > 0) == t)
                    cnt[kd] = cnt.get(kd, 0) + 1
            part = task_held[k : k + 64]
            s = scores([q for q, _, _ in part], [im for _, _, im in part])
            task_hits += sum(int(s[b].argmin()) == part[b][1] for b in range(len(part)))
    model.train()
    per = " ".join(f"{kd} {hit[kd] / cnt[kd]:.3f}" for kd in sorted(hit))
    return f"verify {sum(hit.values()) / sum(cnt.values()):.3f} ({per}) task-by-verifier {task_hits / 256:.3f}"


t0 = time.time()
print(f"step 0 {evaluate()}", flush=True)
losses = []
for step in range(1, a.steps + 1):
    qs, truths, _, ims = batch([f"verify-train:{step * a.bs + j}" for j in range(a.bs)])
    s = scores(qs, ims)
    target = torch.zeros_like(s)
    mask = torch.zeros_like(s)
    for b, t in enumerate(truths):
        target[b, : len(t)] = torch.tensor(t, dtype=s.dtype)
        mask[b, : len(t)] = 1
    loss = (
        torch.nn.functional.binary_cross_entropy_with_logits(s.clamp(-30, 30), target, reduction="none") * mask
    ).sum() / mask.sum()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    losses.append(loss.item())
    if step % a.eval_every == 0:
        print(f"step {step} loss {sum(losses) / len(losses):.3f} {evaluate()} ({time.time() - t0:.0f} s)", flush=True)
        losses = []
if a.save:
    model.save_pretrained(a.save)
    processor.save_pretrained(a.save)
