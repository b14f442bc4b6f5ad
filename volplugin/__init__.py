"""volplugin: a Docker volume plugin whose volumes back up into the layerfs store."""

__version__ = "0.1.0"
