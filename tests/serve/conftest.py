"""Fixtures shared by the service tests: one sharpened tiny model and the synthetic test splits."""

import httpx
import pytest

from hkd4vlm import Detector
from hkd4vlm.data.layout import read_split
from hkd4vlm.models.registry import init_model


@pytest.fixture(scope="package")
def model_dir(synth_root, tmp_path_factory):
    return init_model("tiny-llava-s", synth_root, tmp_path_factory.mktemp("serve") / "tiny", seed=4)


@pytest.fixture(scope="package")
def detector(model_dir, sharpen):
    det = Detector.from_pretrained(model_dir, shifts=4)
    sharpen(det.model, 1)
    return det


@pytest.fixture(scope="package")
def hall(synth_root):
    return read_split(synth_root, "hallucination", "test")


@pytest.fixture(scope="package")
def fact(synth_root):
    return read_split(synth_root, "factuality", "test")


@pytest.fixture(scope="module")
def client(server):
    """An HTTP client of the module's own ``server`` fixture (each module starts its app with its settings)."""
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
