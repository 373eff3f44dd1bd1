"""Quantization technique (ModelQuantizationConfig). Importing this package registers it.

Heavy libraries (torch engines, llm-compressor, bitsandbytes) are imported inside ``run`` so that
``plan`` at Create time stays cheap.
"""

from optjob.techniques.quantize.technique import QuantizationTechnique

__all__ = ["QuantizationTechnique"]
