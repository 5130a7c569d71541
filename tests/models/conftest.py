import pytest

from hkd4vlm.data.layout import read_split
from hkd4vlm.models.loading import load_model
from hkd4vlm.models.registry import init_model


@pytest.fixture(scope="session")
def loaded_preset(synth_root, tmp_path_factory):
    """``loaded_preset(preset)``: (folder, model in eval mode, processor) of a registered preset, built on the
    test dataset's words and loaded back as a checkpoint is: what each family's module-scoped fixture holds."""

    def build(preset: str):
        out = init_model(preset, synth_root, tmp_path_factory.mktemp("models") / preset, seed=0)
        model, processor = load_model(out)
        return out, model.eval(), processor

    return build


@pytest.fixture(scope="module")
def batch(synth_root):
    """Four factuality test records and their images, scored by every family's tests."""
    split = read_split(synth_root, "factuality", "test")
    records = split.records[:4]
    return records, [split.load_image(r) for r in records]
