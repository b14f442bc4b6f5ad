"""Store maintenance: which objects are live, removing the rest (gc), checking them (fsck).

Shared by `layerfs gc`/`layerfs fsck` and the volume plugin's `prune`/`verify`.
"""

from layerfs.maintenance.check import CheckReport, Damage, check_store
from layerfs.maintenance.gc import GcReport, collect_garbage
from layerfs.maintenance.roots import Root, all_roots, backup_roots, image_roots
from layerfs.maintenance.users import Use, find_users

__all__ = [
    "CheckReport",
    "Damage",
    "GcReport",
    "Root",
    "Use",
    "all_roots",
    "backup_roots",
    "check_store",
    "collect_garbage",
    "find_users",
    "image_roots",
]
