"""HTTP routers and the pure codecs they call (Open Inference Protocol, native API)."""
