"""ModelCompilationConfig: CUDA targets with Model Optimizer, Neuron targets with optimum-neuron.

``technique`` is the plug-in (importing this package registers it). Its two halves:

* CUDA: ``cuda_plan`` (rules from ``configs/cuda_compile.yaml``, runtime options) -> ``cuda_compile``
  (the stage) -> ``modelopt_engine`` (quantize, ``export_hf_checkpoint``) -> ``modelopt_verify`` (gate);
* Neuron: ``neuron_plan`` (the exact optimum-neuron 0.4.5 export, from ``configs/neuron.yaml``) ->
  ``neuron_compile`` (the stage) -> ``neuron_env`` / ``neuron_driver`` (optimum-neuron's own interpreter),
  ``neuron_cache`` (the S3 compile cache) and ``neuron_layout`` (gate).
"""

from optjob.techniques.compile.technique import CompilationTechnique

__all__ = ["CompilationTechnique"]
