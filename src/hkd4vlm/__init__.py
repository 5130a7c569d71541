"""hkd4vlm."""
