"""Losses against closed forms and against TRL's generalized_jsd_loss."""

import math

import pytest
import torch

from hkd4vlm.distill.losses import (
    FeatureProjector,
    feature_cosine,
    feature_mse,
    forward_kl,
    generalized_jsd,
    rectify_teacher,
    reverse_kl,
    skew_kl,
    total_variation,
)

DIVERGENCES = [
    forward_kl,
    reverse_kl,
    total_variation,
    lambda s, t, **k: generalized_jsd(s, t, 0.5, **k),
    lambda s, t, **k: skew_kl(s, t, 0.1, **k),
]


def _logits(*rows):
    return torch.log(torch.tensor(rows, dtype=torch.float64))


def test_kl_closed_form():
    p_s, p_t = [0.5, 0.25, 0.25], [0.25, 0.25, 0.5]
    s, t = _logits(p_s), _logits(p_t)
    fwd = sum(b * math.log(b / a) for a, b in zip(p_s, p_t))
    rev = sum(a * math.log(a / b) for a, b in zip(p_s, p_t))
    assert forward_kl(s, t).item() == pytest.approx(fwd)
    assert reverse_kl(s, t).item() == pytest.approx(rev)
    assert total_variation(s, t).item() == pytest.approx(0.25)
    m = [(a + b) / 2 for a, b in zip(p_s, p_t)]
    js = 0.5 * sum(b * math.log(b / c) for b, c in zip(p_t, m)) + 0.5 * sum(a * math.log(a / c) for a, c in zip(p_s, m))
    assert generalized_jsd(s, t, 0.5).item() == pytest.approx(js)
    mix = [0.1 * b + 0.9 * a for a, b in zip(p_s, p_t)]
    assert skew_kl(s, t, 0.1).item() == pytest.approx(sum(b * math.log(b / c) for b, c in zip(p_t, mix)))


def test_jsd_endpoints_and_identity():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    torch.testing.assert_close(generalized_jsd(s, t, 0.0, reduction="none"), forward_kl(s, t, reduction="none"))
    torch.testing.assert_close(generalized_jsd(s, t, 1.0, reduction="none"), reverse_kl(s, t, reduction="none"))
    torch.testing.assert_close(skew_kl(s, t, 0.0), forward_kl(s, t))
    for fn in DIVERGENCES:
        assert fn(s, s).abs().item() < 1e-6
        assert fn(s, t).item() > 0


def test_tau_divides_the_logits():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    torch.testing.assert_close(forward_kl(s, t, tau=2.0), forward_kl(s / 2, t / 2))
    with pytest.raises(ValueError, match="tau"):
        forward_kl(s, t, tau=0.0)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_generalized_jsd_matches_trl(beta, temperature):
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    g = torch.Generator().manual_seed(int(beta * 10 + temperature * 100))
    s, t = 3 * torch.randn(6, 4, generator=g), 3 * torch.randn(6, 4, generator=g)
    ref = gkd.GKDTrainer.generalized_jsd_loss(s, t, beta=beta, temperature=temperature, reduction="none").sum(-1)
    ours = generalized_jsd(s, t, beta, temperature, reduction="none")
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_masking_and_reduction():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    mask = torch.tensor([True, False, True, False])
    per = forward_kl(s, t, reduction="none")
    assert forward_kl(s, t, mask=mask).item() == pytest.approx(((per[0] + per[2]) / 2).item())
    assert forward_kl(s, t, mask=mask, reduction="none")[1].item() == 0.0
    none = torch.zeros(4, dtype=torch.bool)
    for fn in DIVERGENCES:
        value = fn(s.requires_grad_(), t, mask=none)
        assert value.item() == 0.0 and torch.isfinite(value)
        value.backward()  # still differentiable
    with pytest.raises(ValueError, match="reduction"):
        forward_kl(s, t, reduction="sum")


def test_feature_losses_and_projector():
    g = torch.Generator().manual_seed(3)
    h_s, h_t = torch.randn(5, 8, generator=g), torch.randn(5, 12, generator=g)
    proj = FeatureProjector(8, 12)
    loss = feature_cosine(h_s, h_t, proj)
    assert 0 <= loss.item() <= 2
    loss.backward()
    assert proj.proj.weight.grad is not None and proj.proj.weight.grad.abs().sum() > 0
    same = FeatureProjector(8, 8)
    assert feature_cosine(h_s, h_s, same).item() == pytest.approx(0.0, abs=1e-6)
    assert feature_cosine(h_s, -h_s).item() == pytest.approx(2.0)
    assert feature_mse(h_s, h_s + 1).item() == pytest.approx(1.0)


def test_rectify_teacher_swaps_only_where_wrong():
    probs = torch.tensor([[0.6, 0.2, 0.1, 0.1], [0.1, 0.7, 0.15, 0.05]])
    labels = torch.tensor([0, 2])
    out = rectify_teacher(probs, labels)
    torch.testing.assert_close(out[0], probs[0])  # right: unchanged
    torch.testing.assert_close(out[1], torch.tensor([0.1, 0.15, 0.7, 0.05]))
    torch.testing.assert_close(out.sum(-1), torch.ones(2))
    assert out.argmax(-1).tolist() == labels.tolist()


REGISTERED = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "generalized_jsd": generalized_jsd,
    "total_variation": total_variation,
    "skew_kl": skew_kl,
}


def test_registry_holds_the_divergences_and_rejects_unknown_names():
    from hkd4vlm.distill.losses import LOSSES, get_loss, loss_settings, register_loss

    for name, fn in REGISTERED.items():
        assert get_loss(name) is fn
    assert set(REGISTERED) <= set(LOSSES)
    assert loss_settings("generalized_jsd") == {"beta": 0.5} and loss_settings("skew_kl") == {"alpha": 0.1}
    assert loss_settings("forward_kl") == {}
    with pytest.raises(ValueError, match=r"unknown loss 'kl'; known: .*forward_kl.*reverse_kl"):
        get_loss("kl")
    with pytest.raises(ValueError, match="already registered"):
        register_loss("forward_kl")(lambda student_logits, teacher_logits=None, *, teacher_probs=None, tau=1.0: 0)
    with pytest.raises(TypeError, match="teacher_probs"):
        register_loss("no_probs")(lambda student_logits, teacher_logits, *, tau=1.0: 0)
    assert "no_probs" not in LOSSES


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_teacher_probs_match_teacher_logits_and_the_old_logits_round_trip(name):
    """A target distribution handed over directly gives the values of the logits path, and of the stages'
    former round trip through logits τ·log(q) (``_as_logits``), for a mixture with a zero entry too."""
    fn = REGISTERED[name]
    g = torch.Generator().manual_seed(5)
    s, t, t2 = (torch.randn(6, 4, generator=g) for _ in range(3))
    for tau in (0.5, 1.0, 3.0):
        q = torch.softmax(t / tau, -1)
        torch.testing.assert_close(
            fn(s, teacher_probs=q, tau=tau, reduction="none"), fn(s, t, tau=tau, reduction="none"), atol=1e-6, rtol=1e-5
        )
        mix = 0.3 * q + 0.7 * torch.softmax(t2 / tau, -1)
        mix[0] = torch.tensor([0.0, 0.5, 0.5, 0.0])  # e.g. a rectified one-hot-ish target
        old = fn(s, tau * torch.log(mix.clamp_min(1e-12)), tau=tau, reduction="none")
        torch.testing.assert_close(fn(s, teacher_probs=mix, tau=tau, reduction="none"), old, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="exactly one"):
        fn(s, t, teacher_probs=q)
    with pytest.raises(ValueError, match="exactly one"):
        fn(s)
