"""Errors of the backup engine; each names the problem and what to do about it."""

from __future__ import annotations

from volplugin.errors import VolpluginError


class BackupError(VolpluginError):
    """A backup, restore, diff, prune or verify cannot proceed."""


class BackupNotFound(BackupError):
    """No backup has that id (or the id prefix is ambiguous)."""


class RestoreError(BackupError):
    """A restore failed; no file was written with wrong bytes."""


class DamageFound(BackupError):
    """verify found damaged backups."""
