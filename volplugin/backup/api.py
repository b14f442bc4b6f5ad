"""Backup endpoints served on the plugin socket, as a Flask blueprint."""

from __future__ import annotations

from flask import Blueprint

blueprint = Blueprint("backup", __name__)
