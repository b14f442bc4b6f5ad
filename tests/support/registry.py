"""A private image registry (Debian's docker-registry, distribution 2.8) as a subprocess.

It listens on 127.0.0.1 on a free port, plain HTTP without auth, and keeps its
blobs in a temp directory of its own; nothing of the system's registry service
(its config, its port 5000) is used. Images reach it through real clients
(``docker push``), never by writing its files.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.waiting import stop_process, wait_for

REGISTRY = "/usr/bin/docker-registry"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = """\
version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {base}/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
"""


@dataclass
class Registry:
    """A `docker-registry serve` subprocess with its own config and storage under ``base``."""

    base: Path
    port: int
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        """HOST:PORT, as an image reference starts with it."""
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.base / "registry.log"

    def request(
        self, path: str, method: str = "GET", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        """(HTTP status, body) of ``METHOD http://ADDRESS/PATH``."""
        url = f"http://{self.address}/{path}"
        req = urllib.request.Request(url, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def answers(self) -> bool:
        with contextlib.suppress(OSError):
            return self.request("v2/")[0] == 200
        return False

    def tags(self, repository: str) -> list[str]:
        """The tags the registry holds for ``repository`` (none if it does not know it)."""
        status, body = self.request(f"v2/{repository}/tags/list")
        return (json.loads(body).get("tags") or []) if status == 200 else []

    def manifest(self, repository: str, tag: str) -> dict:
        """The image manifest of ``repository:tag`` (Docker's schema 2, as docker pushes it)."""
        accept = {"Accept": f"{DOCKER_MANIFEST}, {OCI_MANIFEST}"}
        status, body = self.request(f"v2/{repository}/manifests/{tag}", headers=accept)
        assert status == 200, f"no manifest {repository}:{tag} ({status}): {body[:200]!r}"
        return json.loads(body)

    def delete_blob(self, repository: str, digest: str) -> None:
        """Remove a blob from ``repository`` through the registry's API."""
        status, body = self.request(f"v2/{repository}/blobs/{digest}", method="DELETE")
        assert status == 202, f"DELETE of {repository}@{digest}: {status} {body[:200]!r}"

    def start(self) -> None:
        config = self.base / "config.yml"
        config.write_text(CONFIG.format(base=self.base, port=self.port))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [REGISTRY, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        wait_for(
            self.answers,
            f"the registry on {self.address} (log {self.log})",
            timeout=60,
            guard=lambda: self.proc is not None and self.proc.poll() is None,
        )

    def stop(self) -> None:
        stop_process(self.proc)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now (the registry cannot bind 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def private_registry() -> Iterator[Registry]:
    """A registry answering on 127.0.0.1; stopped and its storage removed afterwards."""
    if not Path(REGISTRY).is_file():
        raise AssertionError(f"{REGISTRY} is not installed: run scripts/setup.sh")
    base = Path(tempfile.mkdtemp(prefix="lfsreg-", dir="/tmp"))
    registry = Registry(base, free_port())
    try:
        registry.start()
        yield registry
    finally:
        registry.stop()
        shutil.rmtree(base, ignore_errors=True)


def docker_push(registry: Registry, image: str, name: str) -> str:
    """`docker push` the daemon's ``image`` to the registry as ``name`` (REPOSITORY:TAG);
    return the pushed reference. The daemon's tag for it is removed again."""
    ref = f"{registry.address}/{name}"
    subprocess.run(["docker", "tag", image, ref], check=True, capture_output=True)
    try:
        done = subprocess.run(["docker", "push", ref], capture_output=True, text=True)
        if done.returncode != 0:
            raise AssertionError(
                f"docker push {ref} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
            )
    finally:
        subprocess.run(["docker", "rmi", ref], check=False, capture_output=True)
    return ref
