"""Two (or more) "hosts" on one machine for tests: a dockerd and its plugins per host.

    with two_hosts() as (a, b):
        plugin = a.start_plugin("vp-roam", host_id="host-a", store=url)
        a.docker("volume", "create", "-d", "vp-roam", "v1")

A host is a mount and network namespace kept by a small holder process (so it outlives
restarts of its daemon), in which /run/docker/plugins is the host's own directory
(WORK/plugins, bind-mounted). Its dockerd runs in both namespaces, with data root, exec
root, pidfile and API socket under WORK (a directory in /var/tmp); its network namespace
gives it its own docker0, so the machine's shared daemon and its bridge are never touched.
Its plugins run in the mount namespace only (`nsenter -m`): they share the machine's
loopback, where the S3 gateway listens, and the mounts they make are those their own
daemon's containers see. Two hosts may therefore serve plugins of the same name. Mounts
made in the namespace go with it; `destroy` ends whatever is left in it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.support.mounts import unmount_below
from tests.support.plugin import PLUGIN_DIR, PluginProcess, proc_state, signal_processes
from tests.support.private_dockerd import PrivateDockerd

WORK_BASE = Path("/var/tmp")


def namespace_id(pid: int, kind: str = "mnt") -> str:
    """The id of a process's namespace of `kind` (e.g. "mnt:[4026532175]")."""
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def namespace_members(ns: str, kind: str = "mnt") -> list[int]:
    """The pids of the processes in the namespace `ns` (an id from `namespace_id`)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):  # gone meanwhile
                if namespace_id(int(entry), kind) == ns:
                    found.append(int(entry))
    return found


def running(pid: int) -> bool:
    """Whether `pid` is a process that has not ended (zombies have)."""
    return proc_state(pid) not in ("Z", None)


class HostPlugin(PluginProcess):
    """A `volplugin serve` in a host's mount namespace.

    Its pid is the server's own (nsenter execs it), so `kill`, `pause` and `stop`
    signal the server itself; `socket` is the host-side path of its socket.
    """

    def __init__(
        self, host: Host, root: Path, name: str, env: dict[str, str], args: Sequence[str] = ()
    ) -> None:
        super().__init__(root, name, plugin_dir=PLUGIN_DIR, env=env, args=tuple(args))
        self.host = host
        self.socket = host.plugin_dir / f"{name}.sock"

    def command(self) -> list[str]:
        return [*self.host.nsenter(), *super().command()]


class Host(PrivateDockerd):
    """One host: its namespaces, its dockerd (`env`, `docker()`, `client()` as for a
    PrivateDockerd) and the plugins started with `start_plugin`."""

    def __init__(self, name: str, base: Path = WORK_BASE) -> None:
        work = Path(tempfile.mkdtemp(prefix=f"vp-{name}-", dir=base))
        super().__init__(work=work, exec_root=work / "exec")  # API socket: exec/docker.sock
        self.name = name
        self.plugin_dir = work / "plugins"  # /run/docker/plugins in the namespace
        self.holder: subprocess.Popen | None = None
        self.namespaces: dict[str, str] = {}  # "mnt"/"net" -> the holder's namespace ids
        self.plugins: list[HostPlugin] = []

    # the namespaces

    @property
    def ns_pid(self) -> int:
        """A pid whose namespaces are the host's (the holder's; it outlives the daemon)."""
        if self.holder is None or self.holder.poll() is not None:
            raise RuntimeError(f"{self.name} has no namespaces: start it first")
        return self.holder.pid

    def nsenter(self, *, network: bool = False) -> list[str]:
        """The command prefix that runs a command in the host's mount namespace (and its
        network namespace with `network`), in the current directory."""
        ns = ["-m", "-n"] if network else ["-m"]
        return ["nsenter", "-t", str(self.ns_pid), *ns, f"--wd={os.getcwd()}", "--"]

    def run_in_ns(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in the host's mount namespace (to look at its mounts); text output."""
        proc = subprocess.run(
            [*self.nsenter(), *argv], capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} in {self.name} failed:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def _start_namespaces(self) -> None:
        if self.holder is not None and self.holder.poll() is None:
            return
        self.plugin_dir.mkdir(mode=0o700, exist_ok=True)
        PLUGIN_DIR.mkdir(parents=True, exist_ok=True)  # the mount point
        script = (
            f"mount --make-rprivate / && mount --bind {self.plugin_dir} {PLUGIN_DIR}"
            " && ip link set lo up && echo ready && exec sleep infinity"
        )
        with open(self.work / "holder.log", "ab") as log:
            self.holder = subprocess.Popen(
                ["unshare", "--mount", "--net", "sh", "-c", script],
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                text=True,
                start_new_session=True,
            )
        assert self.holder.stdout is not None
        ready = self.holder.stdout.readline().strip()
        self.holder.stdout.close()
        if ready != "ready":
            self.holder.kill()
            self.holder.wait()
            log_text = (self.work / "holder.log").read_text(errors="replace")
            raise RuntimeError(f"the namespaces of {self.name} failed:\n{log_text}")
        self.namespaces = {kind: namespace_id(self.holder.pid, kind) for kind in ("mnt", "net")}

    # the daemon

    def start(self, timeout: float = 60.0) -> Host:
        """Start the host's dockerd (and its namespaces, the first time); wait until it
        answers."""
        self._start_namespaces()
        super().start(timeout)
        return self

    def _prepare(self) -> None:
        self.exec_root.mkdir(mode=0o700, exist_ok=True)

    def _network_args(self) -> list[str]:
        return []  # its own network namespace, with its own docker0

    def _command(self, config: Path) -> list[str]:
        return [*self.nsenter(network=True), *super()._command(config)]

    @property
    def daemon_pid(self) -> int | None:
        """The dockerd's pid while it runs."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    # plugins

    def start_plugin(
        self,
        name: str,
        *,
        host_id: str,
        store: str,
        root: Path | None = None,
        env: dict[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> HostPlugin:
        """Start `volplugin serve --name NAME --host-id HOST_ID` in the host's mount
        namespace and wait until it answers.

        Its store is `store` (LAYERFS_STORE), its root `root` (default under the host's
        directory, with its log, S3 cache and sidekick sockets), its docker this host's
        daemon; `env` adds variables, `args` more `serve` options.
        """
        base = self.work / f"p-{name}"
        full_env = dict(
            os.environ,
            DOCKER_HOST=self.host,
            LAYERFS_STORE=store,
            LAYERFS_CACHE_DIR=str(base / "cache"),
            **(env or {}),
        )
        full_env.pop("VOLPLUGIN_HOST_ID", None)
        plugin = HostPlugin(
            self,
            Path(root) if root is not None else base / "root",
            name,
            env=full_env,
            args=["--host-id", host_id, "--sidekick-dir", str(base / "sidekick"), *args],
        )
        plugin.start()
        self.plugins.append(plugin)
        return plugin

    def pause(self) -> None:
        """SIGSTOP the host's plugins and everything they started (its daemon keeps
        running)."""
        for plugin in self.plugins:
            if plugin.proc is not None:
                plugin.pause()

    def resume(self) -> None:
        """SIGCONT what `pause` stopped."""
        for plugin in self.plugins:
            plugin.resume()

    def stop_plugins(self) -> None:
        """Stop every plugin started on this host (SIGTERM) and remove its socket."""
        for plugin in self.plugins:
            plugin.cleanup()
        self.plugins.clear()

    # the end

    def destroy(self, timeout: float = 30.0) -> None:
        """Stop the daemon, then the plugins (which answer the daemon's unmounts as it
        stops its containers), end what is left in the namespaces (the namespaces and
        their mounts go with it) and delete the host's directory."""
        self.resume()
        self.stop()
        self.stop_plugins()
        if self.holder is not None:
            if self.holder.poll() is None:
                self.holder.terminate()
            self.holder.wait()
            self.holder = None
        # containerd and the shims end with the daemon; what else is left in the host's
        # namespaces (a lazy volume's view, say) was started there by us
        left = {pid for kind, ns in self.namespaces.items() for pid in namespace_members(ns, kind)}
        signal_processes(sorted(left), signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = {pid for pid in left if running(pid)}
        signal_processes(sorted(left), signal.SIGKILL)
        unmount_below(self.work)  # none are expected outside the namespace
        shutil.rmtree(self.work, ignore_errors=True)


@contextlib.contextmanager
def two_hosts(names: tuple[str, str] = ("host-a", "host-b")) -> Iterator[tuple[Host, Host]]:
    """Two started hosts with the busybox test image, destroyed however the block ends."""
    hosts = [Host(name) for name in names]
    try:
        for host in hosts:
            host.start()
            host.ensure_busybox()
        yield hosts[0], hosts[1]
    finally:
        for host in hosts:
            host.destroy()
