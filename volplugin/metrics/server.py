"""`serve --metrics-address`: Prometheus metrics over HTTP, on one address only.

The registry is the plugin's own (no process-wide default): the state collector
(volplugin.metrics.collector), the roaming collector when the plugin serves roaming
volumes (`app.config["VOLPLUGIN_ROAMING"]`), and
`volplugin_request_duration_seconds{endpoint, outcome, socket}`, a histogram of request
latency fed by the access log's observers, for requests on the plugin socket
(`socket="plugin"`) and on sidekick sockets (`socket="sidekick"`). Paths that are no
endpoint count as `endpoint="other"`, so a client cannot grow the label set. A
non-loopback address is refused unless allowed (`--metrics-allow-remote`): the metrics
name every volume.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Any

from flask import Flask

from volplugin.errors import VolpluginError
from volplugin.protocol.app import ACCESS_EXTENSION
from volplugin.volumes.service import VolumeService

log = logging.getLogger("volplugin.metrics")

# seconds: Mount/Get take milliseconds, a backup or restore minutes
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                   60, 120, 300, 600, 1800)  # fmt: skip


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, allow_remote: bool = False) -> Address:
    """`HOST:PORT` (`[V6]:PORT`), HOST an IP address or `localhost`; loopback unless allowed."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise VolpluginError(f"metrics address {text!r} is not HOST:PORT: e.g. 127.0.0.1:9101")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise VolpluginError(
            f"metrics address {text!r}: give an IP address (or localhost), not a host name"
        ) from None
    if not ip.is_loopback and not allow_remote:
        raise VolpluginError(
            f"metrics address {text!r} is not a loopback address: the metrics name every "
            "volume; add --metrics-allow-remote to serve them there"
        )
    return Address(str(ip), int(port))


class Metrics:
    """The plugin's registry and the HTTP server that exposes it."""

    def __init__(self, service: VolumeService, app: Flask) -> None:
        from prometheus_client import CollectorRegistry, Histogram

        from volplugin.metrics.collector import RoamingCollector, StateCollector

        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(StateCollector(service))
        roaming = app.config.get("VOLPLUGIN_ROAMING")
        if roaming is not None:
            self.registry.register(RoamingCollector(roaming))
        self.latency = Histogram(
            "volplugin_request_duration_seconds",
            "Time to answer a request, by endpoint, outcome (ok, error) and socket.",
            ["endpoint", "outcome", "socket"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.endpoints = {rule.rule for rule in app.url_map.iter_rules()}
        app.extensions[ACCESS_EXTENSION].observers.append(self.observe)
        self._server: Any = None
        self._thread: Any = None

    def observe(self, line: dict) -> None:
        """An access-log line (volplugin.protocol.accesslog) into the latency histogram."""
        endpoint = line["endpoint"] if line["endpoint"] in self.endpoints else "other"
        socket = "sidekick" if "scope" in line else "plugin"
        self.latency.labels(endpoint, line["outcome"], socket).observe(line["duration_ms"] / 1000)

    @classmethod
    def serve(cls, service: VolumeService, app: Flask, address: Address) -> Metrics:
        """The metrics of `service` and `app`, served on `address` from now on."""
        metrics = cls(service, app)
        metrics.start(address)
        return metrics

    def start(self, address: Address) -> Address:
        """Serve /metrics on `address`; return where (the port chosen, for port 0)."""
        from prometheus_client import start_http_server

        try:
            self._server, self._thread = start_http_server(
                address.port, addr=address.host, registry=self.registry
            )
        except OSError as exc:
            raise VolpluginError(f"cannot serve metrics on {address}: {exc}") from None
        bound = Address(address.host, self._server.server_address[1])
        log.info("serving metrics on http://%s/metrics", bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
