"""Test helpers shared across the project (tiny locally built models)."""

from optjob.testing.tiny_model import build_tiny_llama

__all__ = ["build_tiny_llama"]
