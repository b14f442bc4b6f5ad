"""The roaming-volume endpoints on the plugin socket, as a Flask blueprint.

/Roaming.List {} -> {"Volumes": [VOLUME, ...]}: every roaming volume of the plugin's
store (volplugin.roaming.operations.listing). /Roaming.Release {Name, Force, Generation?}
-> {"Name", "Broken": {Host, Since, Generation, Expired} or null}: breaks the volume's
lease (`Force` must be true; with `Generation`, only the lease of that generation).
The views find the RoamingVolumes at ``current_app.config["VOLPLUGIN_ROAMING"]`` (None
when the plugin's store cannot hold roaming volumes).
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app

from layerfs.store.location import default_store_url
from volplugin.errors import BadRequest, VolpluginError
from volplugin.protocol.app import body, field, reply
from volplugin.roaming import operations
from volplugin.roaming.volumes import RoamingVolumes

blueprint = Blueprint("roaming", __name__)


def roaming() -> RoamingVolumes:
    found = current_app.config.get("VOLPLUGIN_ROAMING")
    if found is None:
        url = current_app.config.get("LAYERFS_STORE") or default_store_url()
        raise VolpluginError(
            f"this plugin's store {url} cannot hold roaming volumes: they need a store that "
            "hosts share (s3://BUCKET/PREFIX)"
        )
    return found


@blueprint.route("/Roaming.List", methods=["POST"])
def list_() -> Response:
    body()
    return reply({"Volumes": operations.listing(roaming()), "Err": ""})


@blueprint.route("/Roaming.Release", methods=["POST"])
def release() -> Response:
    doc = body()
    name = field(doc, "Name")
    force = doc.get("Force", False)
    if not isinstance(force, bool):
        raise BadRequest("field 'Force' must be true or false")
    generation = doc.get("Generation")
    if generation is not None and (not isinstance(generation, int) or isinstance(generation, bool)):
        raise BadRequest("field 'Generation' must be an integer")
    if not force:
        raise BadRequest(
            f"Roaming.Release breaks the lease of roaming volume {name!r} whatever host holds "
            "it (that host's containers lose the volume; what they wrote after its head "
            "backup is lost): send Force: true"
        )
    broken = operations.break_lease(roaming(), name, generation)
    return reply({"Name": name, "Broken": broken.to_json() if broken else None, "Err": ""})
