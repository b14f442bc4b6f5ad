"""Errors of the volume plugin; each message names the problem and what to do about it."""

from __future__ import annotations

from layerfs.errors import LayerfsError


class VolpluginError(LayerfsError):
    """Base class: the plugin answers it as {"Err": message}, the CLI prints it as one line."""


class BadRequest(VolpluginError):
    """The request body is not what the protocol says (malformed JSON, missing field, too big)."""


class BadName(VolpluginError):
    """A volume name that could escape the root or that the filesystem cannot hold."""


class BadOption(VolpluginError):
    """An unknown option or an option value that does not parse."""


class VolumeNotFound(VolpluginError):
    """No volume of that name exists."""


class VolumeExists(VolpluginError):
    """Create was called again for an existing volume with different options."""


class VolumeInUse(VolpluginError):
    """Remove of a volume that containers still mount."""


class StateError(VolpluginError):
    """The state database cannot be opened or is locked by another server."""
