"""Importing an image (archive, OCI layout or local Docker image) into the store.

Each layer is streamed once: parsed into entries, its file content chunked into
the store, its DiffID (and blob digest, where the layout states one) checked.
Hardlink targets are checked across layers. New chunks are compressed and
written on worker threads while the layer is parsed. Only when every layer passed are
the blobs flushed and the docs written, layers first and the image doc last, so
a refused or killed import lists nothing. Layers already in the catalog (by
DiffID) are not read again. The import holds the store's shared lock.
"""

from __future__ import annotations

import sys
import tempfile
from contextlib import AbstractContextManager, suppress
from pathlib import Path
from types import TracebackType

from layerfs.catalog import Catalog, ImageRecord, LayerRecord
from layerfs.errors import ImportRejected, LayerfsError, StoreError
from layerfs.formats.layertar import ContentKeeper, parse_layer
from layerfs.formats.layout import ImagePlan, LayerRef, read_plan
from layerfs.formats.links import LinkChecker
from layerfs.formats.source import Source, open_source
from layerfs.records import Entry, get_tree, put_tree
from layerfs.store.backend import check_doc_name
from layerfs.store.chunks import ChunkStore


def import_archive(
    store: ChunkStore,
    path: Path,
    tag: str | None = None,
    progress: bool = False,
    keep: ContentKeeper | None = None,
) -> ImageRecord:
    """Import `docker save` output or an OCI layout (tar or directory); return its record.

    ``keep`` is given the bytes of each regular file of the layers read (those the
    store lacked), e.g. for the content cache.
    """
    source = open_source(Path(path))
    try:
        plan = read_plan(source, tag)
        name = image_name(plan.names, tag, source.location)
        return _import(store, plan, source, name, progress, str(path), keep)
    finally:
        source.close()


def import_from_docker(
    store: ChunkStore,
    image: str,
    tag: str | None = None,
    progress: bool = False,
    keep: ContentKeeper | None = None,
) -> ImageRecord:
    """Import an image of the local Docker daemon (streamed with `docker save`); ``keep``
    as for import_archive."""
    import docker

    try:
        client = docker.from_env(timeout=600)
        found = client.images.get(image)
    except docker.errors.ImageNotFound:
        raise ImportRejected(f"the Docker daemon has no image {image!r}") from None
    except docker.errors.DockerException as exc:
        raise ImportRejected(f"cannot reach the Docker daemon: {exc}") from exc
    tags = list(found.tags)
    named = next((t for t in (image, image + ":latest") if t in tags), None)
    name = tag or named or (tags[0] if tags else None)
    if name is None:
        raise ImportRejected(f"the image {image!r} has no repository tag: name it with --tag")
    with tempfile.TemporaryDirectory(prefix="layerfs-import-") as tmp:
        spool = Path(tmp) / "image.tar"
        try:
            with open(spool, "wb") as out:
                for chunk in found.save(chunk_size=1 << 20, named=named or False):
                    out.write(chunk)
        except docker.errors.DockerException as exc:
            raise ImportRejected(f"the Docker daemon could not export {image!r}: {exc}") from exc
        except OSError as exc:
            raise ImportRejected(f"cannot spool {image!r} to {tmp}: {exc.strerror}") from exc
        record = import_archive(store, spool, name, progress, keep)
    return record


def image_name(names: list[str], tag: str | None, location: str) -> str:
    """The catalog name of an image: --tag, else its own first name, normalised."""
    chosen = tag or next(iter(names), None)
    if not chosen:
        raise ImportRejected(f"{location}: the image carries no name: give one with --tag")
    name = normalize_name(chosen)
    try:
        check_doc_name(f"images/{name}.json")
    except StoreError:
        raise ImportRejected(
            f"{name!r} is not a usable image name: choose another with --tag"
        ) from None
    return name


def normalize_name(name: str) -> str:
    """'docker.io/library/busybox' -> 'busybox:latest'; names keep an explicit tag."""
    for prefix in ("docker.io/library/", "docker.io/"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    last = name.rsplit("/", 1)[-1]
    if ":" not in last and "@" not in name:
        name += ":latest"
    return name


def _import(
    store: ChunkStore,
    plan: ImagePlan,
    source: Source,
    name: str,
    progress: bool,
    origin: str,
    keep: ContentKeeper | None,
) -> ImageRecord:
    catalog = Catalog(store.backend)
    checker = LinkChecker()
    layers: list[LayerRecord] = []
    new: dict[str, LayerRecord] = {}
    seen: dict[str, list[Entry]] = {}
    with (
        store.backend.lock(exclusive=False),
        _Progress(progress, plan, source) as bar,
        store.background_writes(),
    ):
        for ref in plan.layers:
            bar.start(ref)
            record = new.get(ref.diff_id) or catalog.get_layer(ref.diff_id)
            entries = seen.get(ref.diff_id) or _known_entries(store, record)
            if record is None or entries is None:
                record, entries = _import_layer(store, source, ref, bar, keep)
                new[ref.diff_id] = record
            seen[ref.diff_id] = entries
            checker.add_layer(entries, ref.label)
            layers.append(record)
            bar.done(ref)
        store.flush()
        for record in new.values():
            catalog.put_layer(record)
        image = ImageRecord(
            name=name,
            id=plan.image_id,
            config=plan.config,
            layers=layers,
            added_bytes=sum(r.stored_bytes for r in new.values()),
            source=f"{plan.layout}:{origin}",
        )
        catalog.put_image(image)
    return image


def _known_entries(store: ChunkStore, record: LayerRecord | None) -> list[Entry] | None:
    """Entries of an already imported layer, or None if its tree cannot be read."""
    if record is None:
        return None
    try:
        return get_tree(store, record.tree)[0]
    except (LayerfsError, ValueError, KeyError):
        return None


def _import_layer(
    store: ChunkStore, source: Source, ref: LayerRef, bar: _Progress, keep: ContentKeeper | None
) -> tuple[LayerRecord, list[Entry]]:
    where = f"{source.location}: {ref.label}"
    if not source.exists(ref.member):
        raise ImportRejected(f"{where}: the layer is missing from the archive")
    if ref.size is not None and source.size(ref.member) != ref.size:
        raise ImportRejected(
            f"{where}: the layer has {source.size(ref.member)} bytes but the manifest says "
            f"{ref.size}; the archive is damaged or was altered"
        )
    with source.open(ref.member) as raw:
        parsed = parse_layer(store, raw, where, bar.advance, keep)
    if ref.digest is not None and parsed.blob_digest != ref.digest:
        raise ImportRejected(
            f"{where}: the layer blob hashes to {parsed.blob_digest} but the manifest says "
            f"{ref.digest}; the archive is damaged or was altered"
        )
    if parsed.diff_id != ref.diff_id:
        raise ImportRejected(
            f"{where}: the uncompressed layer hashes to {parsed.diff_id} but the image config "
            f"says {ref.diff_id}; the archive is damaged or was altered"
        )
    tree = put_tree(store, parsed.entries, {"diff_id": ref.diff_id})
    store.wait_writes()  # the layer's stats are complete once its chunks are written
    record = LayerRecord(
        diff_id=ref.diff_id,
        tree=tree,
        entries=len(parsed.entries),
        apparent_size=parsed.apparent_size,
        stored_bytes=parsed.stats.bytes_stored,
    )
    return record, parsed.entries


class _Progress(AbstractContextManager["_Progress"]):
    """Layers and bytes of an import on stderr with rich, only when stderr is a terminal."""

    def __init__(self, enabled: bool, plan: ImagePlan, source: Source) -> None:
        self.plan = plan
        self.bar = None
        if not (enabled and sys.stderr.isatty()):
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TransferSpeedColumn,
        )

        self.sizes: dict[int, int] = {}
        for ref in plan.layers:
            with suppress(LayerfsError):
                self.sizes[ref.index] = source.size(ref.member)
        self.finished = 0
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.task = self.bar.add_task("importing", total=sum(self.sizes.values()) or None)

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.bar is not None:
            self.bar.stop()

    def start(self, ref: LayerRef) -> None:
        if self.bar is not None:
            text = f"layer {ref.index}/{len(self.plan.layers)}"
            self.bar.update(self.task, description=text)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def done(self, ref: LayerRef) -> None:
        """A layer is finished (read or skipped): the bar moves past all its bytes."""
        if self.bar is not None:
            self.finished += self.sizes.get(ref.index, 0)
            self.bar.update(self.task, completed=self.finished)
