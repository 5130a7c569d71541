import pytest

from hkd4vlm.data.layout import read_split


@pytest.fixture(scope="module")
def batch(synth_root):
    """Four factuality test records and their images, scored by every family's tests."""
    split = read_split(synth_root, "factuality", "test")
    records = split.records[:4]
    return records, [split.load_image(r) for r in records]
