"""Consistency hooks: quiet the containers that use a volume while it is backed up.

Labels on a container that holds the volume (running or paused):

    volplugin.stop-during-backup=true    stopped before the snapshot, started after
    volplugin.pause-during-backup=true   paused before the snapshot, unpaused after
    volplugin.pre-backup=CMD             `sh -c CMD` runs in it before the snapshot
    volplugin.post-backup=CMD            `sh -c CMD` runs in it after the snapshot

Order: containers without a pre-backup command are stopped or paused first (so they stop
writing); then each container with one runs it and is stopped or paused right after if
labelled. After the snapshot, or when anything fails, every container stopped or paused
is started or unpaused again (latest first), then the post-backup commands run. A failing
pre-backup command (or a failed stop/pause) aborts the backup: the containers are brought
back and nothing else runs. Every action is recorded, for the backup document. A
command's output is read as a stream of which only the last 64 KiB are held, and the
last 2000 characters are kept (`volplugin inspect` escapes its control characters).
A backup job gives a journal (volplugin/jobs/journal.py) in which each container is
recorded before it is stopped or paused, so that a plugin killed meanwhile puts it back
at its next start, and a cancel check run between the steps.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Protocol

import docker

from volplugin.backup.errors import BackupError
from volplugin.volumes import containers
from volplugin.volumes.containers import ContainerRef

log = logging.getLogger("volplugin.backup.hooks")

LABEL_STOP = "volplugin.stop-during-backup"
LABEL_PAUSE = "volplugin.pause-during-backup"
LABEL_PRE = "volplugin.pre-backup"
LABEL_POST = "volplugin.post-backup"
HOOK_TIMEOUT = 600.0  # seconds for one docker call (stop, exec of a dump)
MAX_OUTPUT = 2000  # characters of a command's output kept in messages and records
MAX_READ = 64 * 1024  # bytes of a command's output kept while reading it (its end)

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off", ""})


class HookFailed(BackupError):
    """A consistency hook failed, so the backup was not taken."""


def hook_client() -> docker.DockerClient:
    """A Docker client whose calls may last as long as a stop or a dump takes."""
    return containers.docker_client(timeout=HOOK_TIMEOUT)


@dataclass
class HookAction:
    """One thing done to a container for a backup, and how it went."""

    container: str
    action: str  # stop, start, pause, unpause, pre-backup, post-backup
    ok: bool
    detail: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        text = f"{self.action} {self.container}: {'ok' if self.ok else 'failed'}"
        return f"{text} ({self.detail})" if self.detail and not self.ok else text


@dataclass
class Target:
    """A container holding the volume and what its labels ask for."""

    ref: ContainerRef
    quiesce: str | None = None  # "stop" or "pause"
    pre: str | None = None
    post: str | None = None

    @classmethod
    def of(cls, ref: ContainerRef) -> Target:
        stop = _flag(ref, LABEL_STOP)
        pause = _flag(ref, LABEL_PAUSE)
        if stop and pause:
            raise HookFailed(
                f"container {ref.name} has both {LABEL_STOP} and {LABEL_PAUSE}: keep one label"
            )
        return cls(
            ref,
            "stop" if stop else "pause" if pause else None,
            ref.labels.get(LABEL_PRE) or None,
            ref.labels.get(LABEL_POST) or None,
        )


def _flag(ref: ContainerRef, label: str) -> bool:
    value = ref.labels.get(label)
    if value is None:
        return False
    if value.strip().lower() in _TRUE:
        return True
    if value.strip().lower() in _FALSE:
        return False
    raise HookFailed(
        f"container {ref.name} has {label}={value!r}: use true or false; the backup was not taken"
    )


def _clip(text: str) -> str:
    text = text.strip()
    return text if len(text) <= MAX_OUTPUT else "..." + text[-MAX_OUTPUT:]


def read_tail(chunks: Iterable[bytes], limit: int = MAX_READ) -> bytes:
    """The last `limit` bytes of a stream of chunks, holding no more than that meanwhile."""
    kept: deque[bytes] = deque()
    size = 0
    cut = False
    for chunk in chunks:
        if len(chunk) > limit:
            chunk = chunk[-limit:]
            cut = True
        kept.append(chunk)
        size += len(chunk)
        while size - len(kept[0]) >= limit:
            size -= len(kept.popleft())
            cut = True
    tail = b"".join(kept)
    if len(tail) > limit:
        tail, cut = tail[-limit:], True
    return b"..." + tail if cut else tail


class Journal(Protocol):
    """Where a container is recorded before it is stopped or paused (volplugin/jobs/journal.py)."""

    def record(self, container: str, name: str, action: str, volume: str) -> None: ...

    def clear(self, container: str) -> None: ...


@dataclass
class Quiesce:
    """Context manager around a snapshot; `release()` ends the quiet period early.

    `mounted` says whether the plugin's state shows the volume mounted: when the
    daemon cannot be asked who uses the volume, a mounted volume is not backed up
    (its users might be writing), an unmounted one is. With a `journal`, each container
    is recorded there before it is stopped or paused and cleared once it is put back, so
    a plugin that dies meanwhile puts it back at its next start. `check` runs before each
    step (it raises to abort the backup, e.g. when its job is cancelled).
    """

    client_factory: Callable[[], docker.DockerClient]
    volume: str
    driver: str
    mounted: bool = True
    journal: Journal | None = None
    check: Callable[[], None] | None = None
    actions: list[HookAction] = field(default_factory=list)
    _targets: list[Target] = field(default_factory=list)
    _quiet: list[Target] = field(default_factory=list)
    _client: docker.DockerClient | None = None
    _aborted: bool = False
    _released: bool = False

    def __enter__(self) -> Quiesce:
        self._targets = self._find()
        try:
            for target in self._targets:
                self._check()
                if target.pre:
                    self._pre(target)
                    self._check()
                if target.quiesce:
                    self._quiesce(target)
            self._check()
        except BaseException:
            self._aborted = True
            self.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> list[dict]:
        """Start/unpause what was quieted, then run post-backup commands (once)."""
        if not self._released:
            self._released = True
            for target in reversed(self._quiet):
                self._resume(target)
            if not self._aborted:
                for target in self._targets:
                    if target.post and target.ref.state == "running":
                        self._exec(target, "post-backup", target.post)
            if self._client is not None:
                self._client.close()
        return [a.to_json() for a in self.actions]

    def summary(self) -> list[str]:
        return [str(a) for a in self.actions]

    def problems(self) -> list[str]:
        return [str(a) for a in self.actions if not a.ok]

    # -- steps ---------------------------------------------------------------------------

    def _check(self) -> None:
        if self.check is not None:
            self.check()

    def _find(self) -> list[Target]:
        try:
            self._client = self.client_factory()
            refs = containers.containers_using(self._client, self.volume, self.driver)
        except docker.errors.DockerException as exc:
            if self.mounted:
                raise HookFailed(
                    f"cannot ask the Docker daemon which containers use volume {self.volume!r} "
                    f"({exc}); it is mounted, so the backup was not taken: start dockerd, or "
                    "stop the containers that use it"
                ) from None
            log.warning("volume %s: no Docker daemon (%s); nothing mounts it", self.volume, exc)
            return []
        targets = [Target.of(ref) for ref in refs]
        # Containers without a pre-backup command go quiet first, then the others in turn.
        return sorted(targets, key=lambda t: (t.pre is not None, t.ref.name))

    def _pre(self, target: Target) -> None:
        assert target.pre is not None
        if target.ref.state != "running":
            self._note(target, "pre-backup", False, f"container is {target.ref.state}")
            raise HookFailed(
                f"pre-backup command of container {target.ref.name} cannot run: the container "
                f"is {target.ref.state}; unpause it; the backup was not taken"
            )
        action = self._exec(target, "pre-backup", target.pre)
        if not action.ok:
            raise HookFailed(
                f"pre-backup command of container {target.ref.name} failed ({action.detail}); "
                "the backup was not taken"
            )

    def _quiesce(self, target: Target) -> None:
        if target.ref.state != "running":
            self._note(target, target.quiesce or "", True, f"already {target.ref.state}")
            return
        api = self._api()
        if self.journal is not None:  # before: a crash right after the stop must find it
            done = "stopped" if target.quiesce == "stop" else "paused"
            self.journal.record(target.ref.id, target.ref.name, done, self.volume)
        try:
            if target.quiesce == "stop":
                api.stop(target.ref.id)
            else:
                api.pause(target.ref.id)
        except docker.errors.DockerException as exc:
            if self.journal is not None:
                self.journal.clear(target.ref.id)
            self._note(target, target.quiesce or "", False, str(exc))
            raise HookFailed(
                f"cannot {target.quiesce} container {target.ref.name} ({exc}); "
                "the backup was not taken"
            ) from None
        self._quiet.append(target)
        self._note(target, target.quiesce or "", True)

    def _resume(self, target: Target) -> None:
        action = "start" if target.quiesce == "stop" else "unpause"
        api = self._api()
        try:
            if action == "start":
                api.start(target.ref.id)
            else:
                api.unpause(target.ref.id)
        except docker.errors.DockerException as exc:
            log.error("volume %s: cannot %s %s: %s", self.volume, action, target.ref.name, exc)
            self._note(target, action, False, str(exc))
            return  # a journal record stays: the next start of the plugin tries again
        if self.journal is not None:
            self.journal.clear(target.ref.id)
        self._note(target, action, True)

    def _exec(self, target: Target, which: str, command: str) -> HookAction:
        api = self._api()
        try:
            exec_id = api.exec_create(target.ref.id, ["sh", "-c", command])["Id"]
            output = read_tail(api.exec_start(exec_id, stream=True)).decode(errors="replace")
            code = api.exec_inspect(exec_id).get("ExitCode")
        except docker.errors.DockerException as exc:
            return self._note(target, which, False, f"docker exec failed: {exc}")
        if code == 0:
            return self._note(target, which, True, _clip(output))
        return self._note(target, which, False, f"exit code {code}, output: {_clip(output)}")

    def _api(self) -> docker.APIClient:
        assert self._client is not None
        return self._client.api

    def _note(self, target: Target, action: str, ok: bool, detail: str = "") -> HookAction:
        entry = HookAction(target.ref.name, action, ok, detail)
        self.actions.append(entry)
        log.info("volume %s: %s", self.volume, entry)
        return entry
