"""The MC engine: N stochastic passes over B rows, keyed masks, streamed statistics.

Owns the program (the fx prefix/suffix partition, or the whole-model fallback), the stochastic
sites, keyed masks, sampling, chunking, streaming moments, accumulators and the partial
statistics of a sample range. Pure tensor code: it imports only mcdrop.config,
mcdrop.errors and mcdrop.uncertainty, and knows nothing of servers, shards or files.
"""
