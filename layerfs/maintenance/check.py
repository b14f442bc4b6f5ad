"""Checking a store: every referenced object exists, and (optionally) re-hashing objects.

One implementation for `layerfs fsck` (every root, every object re-hashed) and
`volplugin verify` (backup roots only, referenced objects, maybe a subset).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from layerfs.errors import CorruptObject, ObjectMissing, StoreError
from layerfs.maintenance.liveset import DigestSets
from layerfs.maintenance.mark import mark_roots
from layerfs.maintenance.roots import Root
from layerfs.maintenance.users import Use, find_users
from layerfs.store.chunks import ChunkStore


@dataclass(frozen=True, slots=True)
class Damage:
    """One damaged object: missing, corrupt, or an unreadable tree record."""

    digest: str
    problem: str  # "missing" | "corrupt" | "unreadable"
    detail: str = ""


@dataclass
class CheckReport:
    """What a check found: figures, damaged objects, and who uses them."""

    roots: int = 0
    referenced: int = 0
    checked: int = 0  # objects re-hashed
    damage: list[Damage] = field(default_factory=list)
    uses: list[Use] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damage

    def damaged_owners(self) -> dict[str, list[str]]:
        """Owner -> sorted affected paths."""
        out: dict[str, set[str]] = {}
        for use in self.uses:
            out.setdefault(use.owner, set()).add(use.path)
        return {owner: sorted(paths) for owner, paths in sorted(out.items())}

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "roots": self.roots,
            "referenced": self.referenced,
            "checked": self.checked,
            "damage": [
                {"digest": d.digest, "problem": d.problem, "detail": d.detail} for d in self.damage
            ],
            "affected": [{"owner": o, "paths": p} for o, p in self.damaged_owners().items()],
        }


def _in_subset(digest: str, percent: float, offset: int) -> bool:
    if percent >= 100:
        return True
    return (int(digest[:8], 16) + offset) % 10000 < percent * 100


def check_store(
    store: ChunkStore,
    roots_factory: Callable[[], Iterable[Root]],
    *,
    read_data: bool,
    all_objects: bool = False,
    subset_percent: float = 100.0,
    progress: Callable[[int], None] | None = None,
) -> CheckReport:
    """Check structure and, with ``read_data``, re-hash objects.

    ``roots_factory`` is called twice (marking, then naming users of damage), so
    roots are never all held in memory. ``all_objects`` re-hashes every stored
    object, referenced or not; otherwise only referenced ones (a deterministic
    but randomly offset ``subset_percent`` of them).
    """
    backend = store.backend
    report = CheckReport()
    damage: dict[str, Damage] = {}
    with DigestSets(backend.cache_dir() / "maintenance") as sets:
        roots = list_counted(roots_factory(), report)
        for bad in mark_roots(store, roots, sets):
            damage[bad.digest] = Damage(bad.digest, bad.problem, bad.reason)
        report.referenced = sets.live_count()
        sets.add_present(backend.iter_blob_times())
        for digest in sets.missing():
            damage.setdefault(digest, Damage(digest, "missing", "referenced but not stored"))
        if read_data:
            offset = random.randrange(10000)
            digests = sets.all_present() if all_objects else sets.live_present()
            for digest in digests:
                if digest in damage or not _in_subset(digest, subset_percent, offset):
                    continue
                try:
                    store.decode(digest, backend.get_blob(digest))
                except CorruptObject as exc:
                    damage[digest] = Damage(digest, "corrupt", str(exc))
                except ObjectMissing as exc:
                    damage[digest] = Damage(digest, "missing", str(exc))
                except StoreError as exc:
                    damage[digest] = Damage(digest, "unreadable", str(exc))
                report.checked += 1
                if progress is not None:
                    progress(report.checked)
    report.damage = sorted(damage.values(), key=lambda d: d.digest)
    report.uses = find_users(store, roots_factory(), set(damage))
    return report


def list_counted(roots: Iterable[Root], report: CheckReport) -> Iterable[Root]:
    """Pass roots through, counting them into the report."""
    for root in roots:
        report.roots += 1
        yield root
