"""HTTP: thin routers (Open Inference Protocol, native /v1, dashboard, metrics), the request
gate and middleware, and the pure codecs they call. The only place that knows HTTP.

May import mcdrop.serving, mcdrop.evaluation, mcdrop.render, mcdrop.model and everything
below them; nothing imports it but mcdrop.app, mcdrop.server and the CLI.
"""
