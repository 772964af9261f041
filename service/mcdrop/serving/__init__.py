"""Serving: the live model set (hot swap), per-model workers with batching, metrics, recent.

May import mcdrop.shards, mcdrop.model, mcdrop.engine, mcdrop.repository and the pure
modules below them; never the HTTP layer.
"""
