"""The job endpoints on the plugin socket, as a Flask blueprint, and the answer of a job start.

/Jobs.List {Volume?, All?} -> {"Jobs": [JOB, ...]}, newest first: every queued or running
job and the last 50 ended ones (All: every job). /Jobs.Get {ID, Wait?} -> {"Job": JOB};
Wait (0..60 s) answers as soon as the job has ended or when Wait has passed.
/Jobs.Cancel {ID} -> {"Job": JOB}: asks a queued or running job to stop. The views find
the JobRunner at ``current_app.config["VOLPLUGIN_JOBS"]``.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app

from volplugin.errors import BadRequest, VolpluginError
from volplugin.jobs.runner import JobRunner
from volplugin.jobs.table import Job
from volplugin.protocol.app import body, failed, field, reply

blueprint = Blueprint("jobs", __name__)

MAX_WAIT = 60.0  # seconds a Jobs.Get may wait


def runner() -> JobRunner:
    jobs = current_app.config.get("VOLPLUGIN_JOBS")
    if jobs is None:
        raise VolpluginError("this plugin runs no jobs: start it with `volplugin serve`")
    return jobs


def answer(job: Job, status_on_error: bool = True) -> Response:
    """{"Job": JOB, "Err": ""}; with `status_on_error`, an ended job that did not succeed
    answers HTTP 500 with its Error as Err."""
    doc = {"Job": job.to_json()}
    if status_on_error and not job.active and job.state != "succeeded":
        return failed(job.error or f"job {job.id} {job.state}", doc)
    return reply({**doc, "Err": ""})


def wait_flag(doc: dict) -> bool:
    """The `Wait` of a request that starts a job (checked before the job is made)."""
    wait = doc.get("Wait", False)
    if not isinstance(wait, bool):
        raise BadRequest("field 'Wait' must be true or false")
    return wait


def started(job: Job, wait: bool) -> Response:
    """The answer to a request that started `job`: at once, or (`wait`) once it has ended."""
    return answer(runner().wait(job.id)) if wait else answer(job)


def _optional_str(doc: dict, key: str) -> str | None:
    value = doc.get(key)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"field {key!r} must be a string")
    return value or None


@blueprint.route("/Jobs.List", methods=["POST"])
def list_() -> Response:
    doc = body()
    jobs = runner().table.listing(_optional_str(doc, "Volume"), every=bool(doc.get("All")))
    return reply({"Jobs": [j.to_json() for j in jobs], "Err": ""})


@blueprint.route("/Jobs.Get", methods=["POST"])
def get() -> Response:
    doc = body()
    job_id = field(doc, "ID", 64)
    wait = doc.get("Wait", 0)
    if not isinstance(wait, int | float) or isinstance(wait, bool) or not 0 <= wait <= MAX_WAIT:
        raise BadRequest(f"field 'Wait' must be a number of seconds from 0 to {MAX_WAIT:.0f}")
    jobs = runner()
    job = jobs.wait(job_id, float(wait)) if wait else jobs.table.get(job_id)
    return answer(job, status_on_error=False)


@blueprint.route("/Jobs.Cancel", methods=["POST"])
def cancel() -> Response:
    job = runner().cancel(field(body(), "ID", 64))
    return answer(job, status_on_error=False)
