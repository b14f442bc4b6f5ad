"""A fake plugin in the test process that answers the jobs API contract on a unix socket.

    with FakePlugin(tmp_path / "plugins", steps=5) as fake:
        volplugin("--plugin-dir", str(fake.plugin_dir), "--name", fake.name, "backup", "v1")

It serves /Backup.Create, /Backup.Restore, /Backup.Prune (each starts a job, refused
while the volume has one), /Jobs.List, /Jobs.Get (long polls), /Jobs.Cancel,
/VolumeDriver.List and /VolumeDriver.Get (with the volume's job in Status) as the jobs
API contract says, and /Roaming.List (roaming volume v1, held by host a) and
/Roaming.Release. A job runs in a thread: `steps` steps of `step_delay` seconds, each
adding one file and `step_bytes` bytes, then it succeeds with a result (or fails with
`fail`). Every request is recorded in `requests` as (endpoint, body).
"""

from __future__ import annotations

import contextlib
import json
import socketserver
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

ENDED = ("succeeded", "failed", "cancelled", "interrupted")
ROAMING = {
    "Name": "v1",
    "Holder": "a",
    "HolderSince": "2026-12-03T17:00:00Z",
    "LeaseExpired": False,
    "ExpiredHolder": None,
    "Generation": 3,
    "Head": None,
    "Local": True,
    "HeldHere": False,
    "LostHere": None,
}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@dataclass
class FakePlugin:
    plugin_dir: Path
    name: str = field(default_factory=lambda: f"fake-{uuid.uuid4().hex[:6]}")
    steps: int = 4
    step_delay: float = 0.2
    step_bytes: int = 1 << 20
    totals: bool = True  # whether the jobs know TotalFiles/TotalBytes
    fail: str | None = None  # the Error of every job, if they should fail
    hold: bool = False  # jobs stay running (never finish) until cancelled
    volumes: tuple[str, ...] = ("v1", "v2")  # what VolumeDriver.List lists
    jobs: dict[str, dict] = field(default_factory=dict)
    requests: list[tuple[str, dict]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.plugin_dir = Path(self.plugin_dir)
        self.socket = self.plugin_dir / f"{self.name}.sock"
        self._changed = threading.Condition()
        self._cancel: set[str] = set()
        self._server: _Server | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> FakePlugin:
        self.plugin_dir.mkdir(parents=True, exist_ok=True)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                doc = json.loads(raw) if raw.strip() else {}
                endpoint = self.path.lstrip("/")
                fake.requests.append((endpoint, doc))
                status, answer = fake.answer(endpoint, doc)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self._server = _Server(str(self.socket), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._changed:
            self._cancel.update(self.jobs)  # let running job threads end
            self._changed.notify_all()
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()

    def calls(self, endpoint: str) -> list[dict]:
        return [doc for name, doc in list(self.requests) if name == endpoint]

    # -- the contract ----------------------------------------------------------------------

    def answer(self, endpoint: str, doc: dict) -> tuple[int, dict]:
        try:
            if endpoint in ("Backup.Create", "Backup.Restore", "Backup.Prune"):
                return self._start(endpoint, doc)
            if endpoint == "Jobs.List":
                with self._changed:
                    jobs = [dict(j) for j in self.jobs.values()]
                if doc.get("Volume"):
                    jobs = [j for j in jobs if j["Volume"] == doc["Volume"]]
                return 200, {"Jobs": jobs[::-1], "Err": ""}
            if endpoint == "Jobs.Get":
                return 200, {"Job": self._wait(doc["ID"], float(doc.get("Wait") or 0)), "Err": ""}
            if endpoint == "Jobs.Cancel":
                return 200, {"Job": self._cancel_job(doc["ID"]), "Err": ""}
            if endpoint == "VolumeDriver.List":
                listed = [{"Name": v, "Mountpoint": f"/fake/volumes/{v}"} for v in self.volumes]
                return 200, {"Volumes": listed, "Err": ""}
            if endpoint == "VolumeDriver.Get":
                return 200, {"Volume": self._volume(doc["Name"]), "Err": ""}
            if endpoint == "Roaming.List":
                return 200, {"Volumes": [ROAMING], "Err": ""}
            if endpoint == "Roaming.Release":
                broken = {"Host": "a", "Since": ROAMING["HolderSince"], "Generation": 3}
                return 200, {"Name": doc["Name"], "Broken": {**broken, "Expired": False}}
            return 500, {"Err": f"POST /{endpoint}: Not Found"}
        except LookupError as exc:
            return 500, {"Err": str(exc.args[0])}

    def _start(self, endpoint: str, doc: dict) -> tuple[int, dict]:
        kind = {"Backup.Create": "backup", "Backup.Restore": "restore"}.get(endpoint, "prune")
        volume = doc.get("Volume")
        with self._changed:
            for other in self.jobs.values():
                busy = other["State"] in ("queued", "running")
                if busy and (volume is None or other["Volume"] in (None, volume)):
                    raise LookupError(
                        f"volume {volume} is busy with {other['Kind']} job {other['ID']}: wait "
                        f"for it (volplugin job {other['ID']} --wait) or cancel it (volplugin "
                        f"job {other['ID']} --cancel)"
                    )
            job = {
                "ID": f"j-{uuid.uuid4().hex[:12]}",
                "Kind": kind,
                "Volume": volume,
                "State": "queued",
                "Created": _now(),
                "Started": None,
                "Finished": None,
                "Progress": {
                    "Files": 0,
                    "Bytes": 0,
                    "TotalFiles": self.steps if self.totals else None,
                    "TotalBytes": self.steps * self.step_bytes if self.totals else None,
                },
                "Result": None,
                "Error": None,
            }
            self.jobs[job["ID"]] = job
            answer = dict(job)
        threading.Thread(target=self._run, args=(job["ID"], doc), daemon=True).start()
        if doc.get("Wait"):
            ended = self._wait(job["ID"], 3600)
            if ended["State"] != "succeeded":
                return 500, {"Job": ended, "Err": ended["Error"]}
            return 200, {"Job": ended, "Err": ""}
        return 200, {"Job": answer, "Err": ""}

    def _run(self, job_id: str, doc: dict) -> None:
        with self._changed:
            job = self.jobs[job_id]
            job.update(State="running", Started=_now())
            self._changed.notify_all()
        step = 0
        while self.hold or step < self.steps:
            with self._changed:
                if job_id in self._cancel:
                    job.update(State="cancelled", Finished=_now(), Error="cancelled on request")
                    self._changed.notify_all()
                    return
                self._changed.wait(self.step_delay)
                if job_id in self._cancel:
                    continue
                if step < self.steps:
                    step += 1
                    progress = dict(job["Progress"])
                    progress["Files"] += 1
                    progress["Bytes"] += self.step_bytes
                    job["Progress"] = progress
                self._changed.notify_all()
        with self._changed:
            if self.fail is not None:
                job.update(State="failed", Finished=_now(), Error=self.fail)
            else:
                job.update(State="succeeded", Finished=_now(), Result=self._result(job, doc))
            self._changed.notify_all()

    def _result(self, job: dict, doc: dict) -> dict:
        files, size = job["Progress"]["Files"], job["Progress"]["Bytes"]
        if job["Kind"] == "backup":
            record = {
                "id": uuid.uuid4().hex,
                "volume": job["Volume"],
                "host": "fakehost",
                "tags": doc.get("Tags") or [],
                "files": files,
                "size": size,
                "bytes_read": size,
                "bytes_new": size // 2,
                "bytes_stored": size // 4,
                "duration": 0.8,
                "hooks": [],
            }
            return {"Backup": record}
        if job["Kind"] == "restore":
            restore = {"id": doc["Backup"], "target": f"/fake/volumes/{job['Volume']}"}
            return {"Restore": {**restore, "entries": files + 1, "files": files, "bytes": size}}
        return {
            "Prune": {
                "dry_run": bool(doc.get("DryRun")),
                "keep": [{"id": "a" * 32, "volume": "v1", "reasons": ["last"]}],
                "remove": [{"id": "b" * 32, "volume": "v1"}],
                "objects_removed": 3,
                "bytes_freed": 3 << 20,
            }
        }

    def _job(self, job_id: str) -> dict:
        if job_id not in self.jobs:
            raise LookupError(f"no job {job_id}")
        return self.jobs[job_id]

    def _wait(self, job_id: str, wait: float) -> dict:
        deadline = time.monotonic() + min(max(wait, 0.0), 60.0)
        with self._changed:
            job = self._job(job_id)
            while job["State"] not in ENDED:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            return dict(job)

    def _cancel_job(self, job_id: str) -> dict:
        with self._changed:
            job = self._job(job_id)
            if job["State"] in ENDED:
                raise LookupError(f"job {job_id} has already {job['State']}: nothing to cancel")
            self._cancel.add(job_id)
            self._changed.notify_all()
            return dict(job)

    def _volume(self, name: str) -> dict:
        with self._changed:
            running = [
                dict(j)
                for j in self.jobs.values()
                if j["Volume"] == name and j["State"] in ("queued", "running")
            ]
        status = {
            "Created": "2026-12-03T17:00:00Z",
            "Size": "4.0 KiB",
            "SizeBytes": 4096,
            "Containers": 0,
            "Options": {},
            "Backup": {"LastTime": None, "Schedule": None},
            "Job": running[0] if running else None,
        }
        return {"Name": name, "Mountpoint": f"/fake/volumes/{name}", "Status": status}
