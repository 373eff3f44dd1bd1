"""Verification gate for optimized models: per-tensor (streamed) and end-to-end (fresh process)."""
