"""Verification gate for optimized models: per-tensor (streamed) and end-to-end (layer by layer)."""
