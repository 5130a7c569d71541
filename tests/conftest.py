import pytest

from hkd4vlm.data.synth.generate import generate


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small medium-level benchmark, generated once per test session."""
    root = tmp_path_factory.mktemp("synth") / "data"
    generate(root, level="medium", sizes={"train": 48, "val": 8, "test": 16}, seed=3, workers=1, baselines=False)
    return root
