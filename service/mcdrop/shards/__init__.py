"""One request's samples run as shards on worker processes or Ray actors, merged exactly.

Owns the ShardExecutor protocol and the ShardRouter, the local pool, the wire format (JSON
and safetensors, never pickle), the worker every backend runs, and the Ray actors. May import
mcdrop.engine, mcdrop.model, mcdrop.repository, mcdrop.config and mcdrop.errors.
"""
