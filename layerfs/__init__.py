"""layerfs: container images in a content-addressed store, served as a union filesystem."""

__version__ = "0.1.0"
