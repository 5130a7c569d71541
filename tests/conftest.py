import pytest

from hkd4vlm.synth.generate import generate


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small medium-level benchmark, generated once per test session."""
    root = tmp_path_factory.mktemp("synth") / "data"
    generate(root, level="medium", sizes={"train": 48, "val": 8, "test": 16}, seed=3, workers=1, baselines=False)
    return root


@pytest.fixture(scope="session")
def sharpen():
    """``sharpen(model, seed)``: add large random noise to every weight, so that a tiny model's answers depend
    strongly on the prompt (a fresh init answers nearly uniformly, which would let a wrong mapping or a
    mixed-up batch pass unnoticed)."""
    import torch

    def add_noise(model, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.15)

    return add_noise
