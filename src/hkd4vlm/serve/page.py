"""The demo page served at ``/``: one HTML file shipped in the package (``page.html``, its script and style
inline, nothing from a CDN), so that it works offline. It calls the service's own endpoints from the browser."""

from __future__ import annotations

from functools import cache
from importlib.resources import files


@cache
def demo_page() -> str:
    """The page's HTML."""
    return files("hkd4vlm.serve").joinpath("page.html").read_text(encoding="utf-8")
