"""Exceptions with messages an operator can act on; the CLI prints them as one line."""


class LayerfsError(Exception):
    """Base class for every error the user should see as a one-line message."""


class StoreError(LayerfsError):
    """The store cannot be opened, read or written."""


class ObjectMissing(StoreError):
    """An object the caller asked for is not in the store."""


class CorruptObject(StoreError):
    """An object's bytes do not match its digest."""


class ImportRejected(LayerfsError):
    """An archive or layer was refused; nothing was recorded."""


class ImageNotFound(LayerfsError):
    """No image of that name or id is in the store."""
