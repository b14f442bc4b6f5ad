#!/bin/sh
# Regenerate the Python modules of the snapshotter's gRPC API
# (layerfs/snapshotter/api/*_pb2.py, *_pb2_grpc.py) from its .proto files.
# Needs grpcio-tools (pip install grpcio-tools); run from anywhere.
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" -m grpc_tools.protoc -I. \
    --python_out=. --grpc_python_out=. \
    layerfs/snapshotter/api/mount.proto layerfs/snapshotter/api/snapshots.proto
