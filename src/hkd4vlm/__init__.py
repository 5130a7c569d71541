"""hkd4vlm: small, fast vision-language judges for hallucination detection and factuality checking,
trained by progressive hybrid knowledge distillation. ``from hkd4vlm import Detector``."""

__all__ = ["Detector", "Detection"]


def __getattr__(name: str):  # imported on first use: the command line stays quick to start
    if name in __all__:
        from .infer import detector

        return getattr(detector, name)
    raise AttributeError(f"module 'hkd4vlm' has no attribute {name!r}")
