"""Reading container image archives: layer tars, compression, and image layouts.

* :mod:`layerfs.formats.streams` - hashing readers and compression detection;
* :mod:`layerfs.formats.paths` - normalising and checking archive paths;
* :mod:`layerfs.formats.layertar` - one layer tar to a list of Entry records;
* :mod:`layerfs.formats.links` - hardlink targets checked across layers;
* :mod:`layerfs.formats.source` - an archive as a directory or a tar file;
* :mod:`layerfs.formats.layout` - docker save and OCI layouts to an import plan.
"""
