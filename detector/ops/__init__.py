"""Tensor helpers for the detector (box arithmetic)."""
