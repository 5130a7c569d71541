"""How many option→letter mappings to score per record, and its one reading: light (no torch), so that the
command line and the service's config can show and check it without loading the model code."""

from __future__ import annotations

from typing import Literal

#: how many option→letter mappings to score per record: a number (capped at the record's option count; 1 =
#: the options as given, one plain pass) or "all" (one per option)
Shifts = int | Literal["all"]
#: mappings scored per record where answers are served (the Detector, `hkd4vlm serve`); evaluation
#: (`predict`) scores one plain pass unless asked, so that it measures the model as it is
DEFAULT_SHIFTS: Shifts = 4


def parse_shifts(value: int | str | None) -> Shifts:
    """The one reading of a shifts setting (``--shifts`` of ``predict`` and ``serve``, ``Detector(shifts=)``,
    ``MappingSpec``): a number of mappings at least 1, given as an int or its digits (``4``, ``"4"``), or
    ``"all"`` (any case) for one mapping per option; ``None`` (YAML ``null``) also means ``"all"``.
    ValueError otherwise."""
    if value is None:
        return "all"
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "all":
            return "all"
        if text.isascii() and text.isdigit():
            value = int(text)
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"shifts must be at least 1 (1: one plain pass; 'all': one per option), got {value}")
        return value
    raise ValueError(f"shifts: expected a number of shifts (at least 1) or 'all', got {value!r}")
