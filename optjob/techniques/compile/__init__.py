"""ModelCompilationConfig: the CUDA (TensorRT-LLM) and Neuron (optimum-neuron) compile techniques.

``neuron_plan`` turns a model's ``config.json`` and the request into the exact export optimum-neuron
0.4.5 would run (its ``NxDNeuronConfig``, compiler arguments, head sharding and command line), from
the rules in ``configs/neuron.yaml``; ``technique`` is the plug-in. Importing this package registers it.
"""

from optjob.techniques.compile.technique import CompilationTechnique

__all__ = ["CompilationTechnique"]
