"""Packaging of optimized model directories: serving.properties and recommended images."""
