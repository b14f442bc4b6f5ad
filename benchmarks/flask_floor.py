"""The floor under the plugin's latency: a minimal Flask app on waitress, nothing else.

It answers every POST with {"Err": ""} after parsing the JSON body, and is served the
way `volplugin serve` serves (waitress threads, volplugin.channel.QuietChannel, the
same number of processes on one listening socket, spread by volplugin.balance), so the
difference between the two is what the plugin's own work costs.

    .venv/bin/python -m benchmarks.flask_floor SOCKET [--workers N] [--threads 8]
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from pathlib import Path

import waitress
from flask import Flask, request

from volplugin.balance import LoadBoard, balance
from volplugin.channel import QuietChannel
from volplugin.server import DEFAULT_THREADS


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
    args = parser.parse_args()
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
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
    server = waitress.create_server(make_app(), sockets=[sock], threads=args.threads)
    server.channel_class = QuietChannel
    balance(server, board, slot)
    server.run()


if __name__ == "__main__":
    main()
