"""Image config JSON: its exact bytes and id, DiffID chains, and the config of a commit.

Config bytes are written the way Go's encoding/json writes them (compact, keys
in their stored order, raw UTF-8, ``<``, ``>``, ``&``, U+2028 and U+2029 escaped),
so a config Docker made usually re-serialises to the same bytes and keeps its
image id, and a config layerfs made always does.
"""

from __future__ import annotations

import copy
import hashlib
import json
from datetime import UTC, datetime

_GO_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def config_bytes(config: dict) -> bytes:
    """The config serialised like Go's json.Marshal."""
    text = json.dumps(config, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in _GO_ESCAPES.items():
        text = text.replace(char, escaped)
    return text.encode("utf-8", "surrogateescape")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def image_id(config: dict) -> str:
    """The image id: the digest of the config bytes."""
    return sha256_digest(config_bytes(config))


def chain_ids(diff_ids: list[str]) -> list[str]:
    """ChainID of every prefix: ChainID(L1) = DiffID(L1), then sha256(parent + ' ' + DiffID)."""
    out: list[str] = []
    for diff_id in diff_ids:
        out.append(diff_id if not out else sha256_digest(f"{out[-1]} {diff_id}".encode()))
    return out


def rfc3339_now() -> str:
    """The current time as Docker writes it (UTC, nanosecond field, 'Z')."""
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond * 1000:09d}Z"


def committed_config(
    base: dict, diff_id: str, created: str, created_by: str, comment: str = "", author: str = ""
) -> dict:
    """The config of ``base`` plus one layer: diff_ids appended, a history entry added."""
    config = copy.deepcopy(base)
    for stale in ("container", "container_config"):
        config.pop(stale, None)
    config["created"] = created
    if author:
        config["author"] = author
    rootfs = config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    rootfs.setdefault("type", "layers")
    rootfs.setdefault("diff_ids", []).append(diff_id)
    entry = {"created": created, "created_by": created_by}
    if author:
        entry["author"] = author
    if comment:
        entry["comment"] = comment
    config.setdefault("history", []).append(entry)
    return config


def with_diff_ids(config: dict, diff_ids: list[str]) -> dict:
    """A copy of ``config`` whose rootfs lists ``diff_ids``."""
    out = copy.deepcopy(config)
    out.setdefault("rootfs", {"type": "layers"})["diff_ids"] = list(diff_ids)
    return out
