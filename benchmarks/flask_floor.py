"""The floor under the plugin's latency: a minimal Flask app on waitress, nothing else.

It answers every POST with {"Err": ""} after parsing the JSON body, and is served the
way `volplugin serve` serves (volplugin.server.waitress_server, the same number of
processes on one listening socket, each keeping to a CPU as volplugin.affinity does
unless `--cpu-affinity off`), so the difference between the two is what the plugin's
own work costs.

    .venv/bin/python -m benchmarks.flask_floor SOCKET [--workers N] [--threads N]
        [--cpu-affinity auto|off]
"""

from __future__ import annotations

import argparse
import os
import socket
import threading
from pathlib import Path

from flask import Flask, request

from volplugin.affinity import MODES, CpuPin, allowed_cpus
from volplugin.balance import LoadBoard
from volplugin.server import DEFAULT_THREADS, waitress_server


def make_app() -> Flask:
    app = Flask(__name__)

    @app.post("/<path:endpoint>")
    def answer(endpoint: str) -> dict:
        request.get_json(force=True, silent=True)
        return {"Err": ""}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("socket")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    parser.add_argument("--cpu-affinity", choices=MODES, default="auto")
    args = parser.parse_args()
    cpus = allowed_cpus(args.cpu_affinity, args.workers)
    if os.path.exists(args.socket):
        os.unlink(args.socket)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(args.socket)
    sock.listen(1024)
    board = LoadBoard.create(Path(f"{args.socket}.board"), args.workers)
    slot = 0
    for worker in range(1, args.workers):
        if os.fork() == 0:
            slot = worker
            break
    if cpus:
        CpuPin(slot, cpus).watch(threading.Event())
    waitress_server(make_app(), sock, args.threads, board, slot).run()


if __name__ == "__main__":
    main()
