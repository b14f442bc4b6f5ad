"""containerd's snapshots API: the .proto files and the modules generated from them
(scripts/gen-snapshotter-api.sh regenerates them; do not edit the *_pb2 files)."""
