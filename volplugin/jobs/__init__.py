"""Durable jobs of `volplugin serve`: backups, restores and prunes run in the background."""
