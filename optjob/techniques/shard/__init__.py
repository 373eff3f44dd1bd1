"""ModelShardingConfig: vLLM ``sharded_state`` checkpoints written by streaming, without vLLM.

``layout`` turns ``config.json`` and ``configs/sharding.yaml`` into the list of vLLM's per-rank
tensors and how each is cut from the source; ``writer`` streams the source through that list
into per-rank part files; ``check`` is the gate that puts every rank back together and compares
it with the source bit for bit before the manifest can be written; ``technique`` is the plug-in.
Importing this package registers it.
"""

from optjob.techniques.shard.technique import ShardingTechnique

__all__ = ["ShardingTechnique"]
