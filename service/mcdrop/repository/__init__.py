"""The model repository: scanning models/, manifests as ModelSpec, architectures, loading.

Nothing is unpickled and nothing outside the repository is loaded. Imports only
mcdrop.config and mcdrop.errors.
"""
