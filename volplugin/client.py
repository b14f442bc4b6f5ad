"""Talking to a running `volplugin serve` over its unix socket (JSON POSTs, standard library).

The socket of the plugin named NAME is PLUGIN_DIR/NAME.sock. Each call is one HTTP POST
on a fresh connection; the plugin's {"Err": ...} answers become PluginError, a missing
or dead socket PluginUnreachable, each with one line saying what to do.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from volplugin.defaults import DEFAULT_NAME, PLUGIN_DIR, plugin_socket
from volplugin.errors import VolpluginError
from volplugin.text import printable

CONTENT_TYPE = "application/json"
SHORT_TIMEOUT = 60.0  # seconds for calls that answer at once (a Get waits for a size walk)

if TYPE_CHECKING:
    import http.client


class PluginUnreachable(VolpluginError):
    """No plugin answers on the socket (none runs, a stale socket, no permission)."""


class PluginError(VolpluginError):
    """The plugin answered with an error; `answer` is its whole JSON answer."""

    def __init__(self, message: str, answer: dict | None = None) -> None:
        super().__init__(message)
        self.answer = answer or {}


def _connection(path: Path, timeout: float | None) -> http.client.HTTPConnection:
    """An HTTP/1.1 connection over the unix socket `path` (http.client is imported here:
    it costs a start that only prints --help)."""
    import http.client

    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout)
                sock.connect(str(path))
            except BaseException:
                sock.close()
                raise
            self.sock = sock

    return UnixConnection("localhost", timeout=timeout)


@dataclass(frozen=True)
class PluginClient:
    """The plugin named `name` whose socket is in `plugin_dir`."""

    name: str = DEFAULT_NAME
    plugin_dir: Path = PLUGIN_DIR

    @property
    def path(self) -> Path:
        return plugin_socket(self.name, self.plugin_dir)

    def call(
        self, endpoint: str, doc: dict | None = None, timeout: float | None = SHORT_TIMEOUT
    ) -> dict:
        """POST `doc` to /`endpoint`; the JSON answer, or PluginError with its Err text.

        `timeout` (seconds, None: none) bounds each wait for the plugin.
        """
        import http.client

        path = self.path
        conn = _connection(path, timeout)
        try:
            try:
                conn.request(
                    "POST",
                    "/" + endpoint.lstrip("/"),
                    body=json.dumps(doc or {}).encode(),
                    headers={"Content-Type": CONTENT_TYPE},
                )
                resp = conn.getresponse()
                raw = resp.read()
            except FileNotFoundError:
                raise PluginUnreachable(
                    f"no plugin named {self.name} is running: no socket at {path}; start "
                    f"`volplugin serve --name {self.name}` or pass --root DIR to work on a "
                    "root directly"
                ) from None
            except ConnectionRefusedError:
                raise PluginUnreachable(
                    f"no plugin named {self.name} is running: nothing answers on {path} (a "
                    f"stale socket); start `volplugin serve --name {self.name}` or pass --root "
                    "DIR to work on a root directly"
                ) from None
            except PermissionError:
                raise PluginUnreachable(
                    f"permission denied on {path}: the plugin socket is root's; run this "
                    "command as root"
                ) from None
            except TimeoutError:
                raise PluginUnreachable(
                    f"the plugin {self.name} did not answer {endpoint} within {timeout} s"
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                raise PluginUnreachable(
                    f"the plugin {self.name} on {path} broke off {endpoint}: {exc or type(exc)}"
                ) from None
        finally:
            conn.close()
        return _answer(self.name, endpoint, resp.status, raw)


def _answer(name: str, endpoint: str, status: int, raw: bytes) -> dict:
    """The JSON answer of a call; PluginError for an error answer."""
    try:
        doc = json.loads(raw) if raw.strip() else {}
    except (ValueError, UnicodeDecodeError):
        doc = None
    if status == 404:
        raise PluginError(
            f"the plugin {name} does not know {endpoint} (HTTP 404): it runs an older "
            "version; restart `volplugin serve` to use this command"
        )
    if not isinstance(doc, dict):
        raise PluginError(f"the plugin {name} answered {endpoint} with HTTP {status} and no JSON")
    err = doc.get("Err")
    if err or status != 200:
        # the text can hold what containers wrote (hook output): escaped, it stays one line
        raise PluginError(printable(err or f"{endpoint} failed with HTTP {status}"), doc)
    return doc
