"""The repository layer above dumb backends.

Backends (a local directory, an S3 bucket) only store, list, read ranges of and
delete named objects. This package is what turns them into a repository that is
safe to keep in someone else's bucket: authenticated encryption of every object
and keyed content IDs (crypto), password-protected key files (keys) and where a
password comes from (password). docs/repository.md describes the format.

Nothing here is wired into the store yet: these are the building blocks.
"""
