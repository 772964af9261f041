"""Training: the MC dropout recipe, Concrete dropout, stacked training, export, demo models.

Produces model folders the repository loads. May import mcdrop.model, mcdrop.engine,
mcdrop.repository, mcdrop.scoring and the pure modules; nothing of serving or HTTP.
"""
