"""The repository layer above the raw backends (a local directory, an S3 bucket).

What makes a store safe to keep in someone else's bucket: authenticated
encryption of every object and keyed content IDs (crypto), password-protected
key files (keys), where a password comes from (password), and opening a store
as a repository (repository: its config, its keys, sealing every object).
layerfs.store.location.open_backend opens every store through it.
docs/repository.md describes the format.
"""
