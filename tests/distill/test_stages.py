"""PPOD and TCRD stages on real tiny models: the terms follow the formulas, teachers get no gradient."""

import pytest
import torch

from hkd4vlm.data.layout import read_split
from hkd4vlm.distill.losses import FeatureProjector, forward_kl, rectify_teacher
from hkd4vlm.distill.stages import PPODStage, TCRDStage, Teacher, coupling_weight, linear_schedule, pyramid_weights
from hkd4vlm.models.loading import load_model
from hkd4vlm.models.registry import init_model
from hkd4vlm.models.scoring import answer_distribution


@pytest.fixture(scope="module")
def pyramid(synth_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("pyr")
    models = {}
    for preset, seed in (("tiny-llava-m", 1), ("tiny-llava-s", 2), ("tiny-idefics3-s", 3)):
        models[preset] = load_model(init_model(preset, synth_root, root / preset, seed=seed))
    split = read_split(synth_root, "hallucination", "train")
    records = split.records[:6]
    return models, records, [split.load_image(r) for r in records]


def test_pyramid_weights():
    assert pyramid_weights(1, 0.5) == [1.0]
    assert pyramid_weights(3, 0.0) == [0.0, 0.0, 1.0]
    assert pyramid_weights(2, 1.0) == [0.5, 0.5]
    assert pyramid_weights(3, 0.5) == pytest.approx([1 / 7, 2 / 7, 4 / 7])


def test_linear_schedule():
    assert linear_schedule(4.0, 1.0, 0, 10) == 4.0
    assert linear_schedule(4.0, 1.0, 5, 10) == 2.5
    assert linear_schedule(4.0, 1.0, 20, 10) == 1.0


def test_coupling_weight():
    p_t = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.7, 0.3]])
    p_a = torch.tensor([[0.4, 0.6], [0.64, 0.36], [0.3, 0.7], [0.8, 0.2]])
    labels = torch.tensor([0, 0, 1, 1])
    c = coupling_weight(p_t, p_a, labels)
    # disagree -> 0; agree and right -> sqrt(0.6 * 0.64); agree and right -> sqrt(.8 * .7); agree, wrong -> 0
    torch.testing.assert_close(c, torch.tensor([0.0, (0.6 * 0.64) ** 0.5, (0.8 * 0.7) ** 0.5, 0.0]))


def test_ppod_terms_and_frozen_cross_family_teachers(pyramid):
    models, records, images = pyramid
    student_model, student_proc = models["tiny-llava-s"]
    teachers = [Teacher(*models["tiny-idefics3-s"], name="far"), Teacher(*models["tiny-llava-m"], name="near")]
    stage = PPODStage(teachers, gamma=0.5, tau=(4.0, 2.0), alpha=(0.2, 0.6), total_steps=10)
    scores = answer_distribution(student_model, student_proc, records, images)
    terms = stage(scores, records, images=images, step=5)
    tau, alpha = 3.0, 0.4
    w = pyramid_weights(2, 0.5)
    q = sum(wj * torch.softmax(t.scores(records, images).logits / tau, -1) for wj, t in zip(w, teachers))
    labels = torch.tensor([r.label for r in records])
    kd = (q * (q.log() - torch.log_softmax(scores.logits / tau, -1))).sum(-1).mean()
    ce = torch.nn.functional.cross_entropy(scores.logits, labels)
    torch.testing.assert_close(terms["total"], alpha * ce + (1 - alpha) * tau**2 * kd, atol=1e-5, rtol=1e-5)
    terms["total"].backward()
    assert all(p.grad is None for t in teachers for p in t.model.parameters())
    assert all(not t.model.training for t in teachers)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student_model.parameters())


def test_tcrd_terms_and_projector_gradient(pyramid):
    models, records, images = pyramid
    student_model, student_proc = models["tiny-llava-s"]
    teacher, assistant = Teacher(*models["tiny-llava-m"]), Teacher(*models["tiny-idefics3-s"])
    h_s = student_model.config.text_config.hidden_size
    h_a = assistant.model.config.text_config.hidden_size
    projector = FeatureProjector(h_s, h_a)
    stage = TCRDStage(teacher, assistant, projector, tau=2.0, lambda_feat=0.5)
    scores = answer_distribution(student_model, student_proc, records, images)
    terms = stage(scores, records, images=images)
    labels = torch.tensor([r.label for r in records])
    t, a = teacher.scores(records, images), assistant.scores(records, images)
    c = coupling_weight(t.probs, a.probs, labels)
    r = rectify_teacher(torch.softmax(t.logits / 2.0, -1), labels)
    resp = forward_kl(scores.logits, 2.0 * r.log(), tau=2.0, reduction="none")  # the old logits round trip
    ce = torch.nn.functional.cross_entropy(scores.logits, labels, reduction="none")
    feat = 1 - torch.nn.functional.cosine_similarity(projector(scores.hidden), a.hidden, dim=-1).mean()
    expected = ((1 - c) * ce).mean() + (c * 4.0 * resp).mean() + 0.5 * feat
    torch.testing.assert_close(terms["total"], expected, atol=1e-5, rtol=1e-5)
    assert 0.0 <= terms["coupling_mean"].item() <= 1.0
    terms["total"].backward()
    assert projector.proj.weight.grad is not None and projector.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.model.parameters())


def test_stages_use_the_divergence_they_are_given(pyramid):
    """``loss=`` replaces forward KL in the distillation term (the mixture / rectified target handed over as
    ``teacher_probs``); every other term is unchanged."""
    from functools import partial

    from hkd4vlm.distill.losses import generalized_jsd, reverse_kl

    models, records, images = pyramid
    student_model, student_proc = models["tiny-llava-s"]
    teachers = [Teacher(*models["tiny-idefics3-s"]), Teacher(*models["tiny-llava-m"])]
    scores = answer_distribution(student_model, student_proc, records, images)
    tau = 3.0
    q = sum(
        w * torch.softmax(t.scores(records, images).logits / tau, -1) for w, t in zip(pyramid_weights(2, 0.5), teachers)
    )
    terms = PPODStage(teachers, tau=(4.0, 2.0), total_steps=10, loss=reverse_kl)(scores, records, images=images, step=5)
    torch.testing.assert_close(terms["kd"], reverse_kl(scores.logits, teacher_probs=q, tau=tau))
    default = PPODStage(teachers, tau=(4.0, 2.0), total_steps=10)(scores, records, images=images, step=5)
    assert not torch.allclose(terms["kd"], default["kd"]) and torch.equal(terms["ce"], default["ce"])

    teacher, assistant = teachers[1], teachers[0]
    projector = FeatureProjector(student_model.config.text_config.hidden_size, assistant.hidden_size)
    jsd = partial(generalized_jsd, beta=0.3)
    terms = TCRDStage(teacher, assistant, projector, tau=2.0, loss=jsd)(scores, records, images=images)
    labels = torch.tensor([r.label for r in records])
    r = rectify_teacher(torch.softmax(teacher.scores(records, images).logits / 2.0, -1), labels)
    torch.testing.assert_close(terms["resp"], generalized_jsd(scores.logits, teacher_probs=r, beta=0.3, tau=2.0))


def test_ppod_mutual_updates_the_nearest_teacher_only(synth_root, tmp_path):
    split = read_split(synth_root, "hallucination", "train")
    records = split.records[:4]
    images = [split.load_image(r) for r in records]
    far = Teacher(*load_model(init_model("tiny-llava-m", synth_root, tmp_path / "far", seed=1)))
    near = Teacher(*load_model(init_model("tiny-idefics3-s", synth_root, tmp_path / "near", seed=2)))
    student, proc = load_model(init_model("tiny-llava-s", synth_root, tmp_path / "s", seed=3))
    far_before = [p.detach().clone() for p in far.model.parameters()]
    near_before = [p.detach().clone() for p in near.model.parameters()]
    stage = PPODStage([far, near], gamma=0.5, mutual_lr=1e-2, total_steps=4)
    scores = answer_distribution(student, proc, records, images)
    terms = stage(scores, records, images=images, step=0)
    assert "mutual_teacher_loss" in terms and torch.isfinite(terms["mutual_teacher_loss"])
    terms["total"].backward()
    assert all(torch.equal(a, b) for a, b in zip(far_before, far.model.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(near_before, near.model.parameters()))
    assert all(p.grad is None for p in near.model.parameters())  # the student's loss does not reach it
    state = stage.state_dict()
    assert set(state) == {"teacher", "optimizer"}
    fresh = PPODStage([far, Teacher(*load_model(tmp_path / "near"))], mutual_lr=1e-2)
    fresh.load_state_dict(state)
    for a, b in zip(fresh.teachers[-1].model.parameters(), near.model.parameters()):
        assert torch.equal(a, b)
