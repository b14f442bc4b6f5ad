"""The changeset writer on real kernel overlayfs upper dirs and on hand-made ones."""

from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
from pathlib import Path

import pytest

from layerfs.changeset import build_changeset, docker_diff, scan_upper
from layerfs.formats.layertar import INLINE_MAX, parse_layer
from layerfs.layertar import write_layer
from layerfs.records import Entry, Kind, read_content
from layerfs.store.chunks import WriteStats
from layerfs.store.location import open_store
from tests.support.lfscommit import overlay_mount

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="overlay mounts need root")


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)


@pytest.fixture
def lower(tmp_path: Path) -> Path:
    root = tmp_path / "lower"
    _write(root / "a/x", "x\n")
    _write(root / "a/y", "y\n")
    for i in range(50):
        _write(root / f"big/f{i}", f"{i}\n")
    _write(root / "c", "c\n")
    _write(root / "old/sub/z", "z\n")
    _write(root / "log", "line\n", 0o640)
    return root


def _lower_entries(root: Path) -> dict[str, Entry]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            st = os.lstat(full)
            rel = str(full.relative_to(root))
            kind = Kind.DIR if stat.S_ISDIR(st.st_mode) else Kind.FILE
            out[rel] = Entry(
                rel, kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
                st.st_size if kind is Kind.FILE else 0,
            )  # fmt: skip
    return out


def _change(mnt: Path) -> None:
    os.unlink(mnt / "c")
    shutil.rmtree(mnt / "big")
    (mnt / "big").mkdir()
    _write(mnt / "big/new", "new\n")
    os.setxattr(mnt / "a/x", "user.note", b"\xffbinary")
    os.link(mnt / "a/y", mnt / "a/ylink")
    shutil.move(mnt / "old", mnt / "renamed")  # overlayfs without redirect_dir copies
    with open(mnt / "log", "a") as f:
        f.write("more\n")
    os.chmod(mnt / "log", 0o600)


def test_overlay_upper_becomes_ordered_changeset(tmp_path: Path, lower: Path) -> None:
    store = open_store(str(tmp_path / "store"))
    with overlay_mount(lower, tmp_path / "ov") as (mnt, upper):
        _change(mnt)
        entries = build_changeset(store, upper, mnt, _lower_entries(lower))
        got = [(e.kind.value, e.path) for e in entries]
        assert got == [
            ("w", "c"),
            ("w", "old"),
            ("d", "a"),
            ("f", "a/x"),
            ("f", "a/y"),
            ("h", "a/ylink"),
            ("d", "big"),
            ("o", "big"),
            ("f", "big/new"),
            ("f", "log"),
            ("d", "renamed"),
            ("d", "renamed/sub"),
            ("f", "renamed/sub/z"),
        ]
        by_path = {e.path: e for e in entries if e.kind is not Kind.OPAQUE}
        assert by_path["a/ylink"].target == "a/y"
        assert by_path["a/x"].xattrs == {"user.note": b"\xffbinary"}
        assert by_path["log"].mode == 0o600 and by_path["log"].size == len("line\nmore\n")

        buf = io.BytesIO()
        digest = write_layer(entries, store, buf)
        again = write_layer(entries, store)
        assert digest == again, "the same entries must give the same tar"
        with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tar:
            members = tar.getmembers()
        names = [m.name for m in members]
        assert len(names) == len(set(names)), "no path twice"
        assert names[names.index("big") + 1] == "big/.wh..wh..opq"
        assert names[:2] == [".wh.c", ".wh.old"], "whiteouts come before their siblings"
        x = members[names.index("a/x")]
        assert x.pax_headers["SCHILY.xattr.user.note"].encode("utf-8", "surrogateescape") == (
            b"\xffbinary"
        )
        link = members[names.index("a/ylink")]
        assert link.islnk() and link.linkname == "a/y"


def test_layer_reparses_to_the_same_diffid(tmp_path: Path, lower: Path) -> None:
    """The importer's tar reader reads a committed layer back into entries that
    regenerate the very same tar, so one parser serves both directions."""
    store = open_store(str(tmp_path / "store"))
    with overlay_mount(lower, tmp_path / "ov") as (mnt, upper):
        _change(mnt)
        entries = build_changeset(store, upper, mnt, _lower_entries(lower))
    buf = io.BytesIO()
    digest = write_layer(entries, store, buf)
    buf.seek(0)
    parsed = parse_layer(store, buf, "committed layer")
    assert parsed.diff_id == digest.diff_id
    assert write_layer(parsed.entries, store).diff_id == digest.diff_id


def test_docker_diff_of_overlay_changes(tmp_path: Path, lower: Path) -> None:
    store = open_store(str(tmp_path / "store"))
    with overlay_mount(lower, tmp_path / "ov") as (mnt, upper):
        _change(mnt)
        changes = docker_diff(upper, mnt, _lower_entries(lower))
    expected = {("C", "a"), ("C", "a/x"), ("A", "a/ylink"), ("C", "big"), ("A", "big/new")}
    expected |= {("D", f"big/f{i}") for i in range(50)}
    expected |= {("D", "c"), ("D", "old"), ("C", "log")}
    expected |= {("A", "renamed"), ("A", "renamed/sub"), ("A", "renamed/sub/z")}
    # a/x only gained an xattr: docker diff ignores that, and so do we
    expected.discard(("C", "a/x"))
    assert set(changes) == expected
    assert [p for _, p in changes] == sorted(p for _, p in changes)
    del store


def test_metacopy_stub_content_comes_from_the_mount(tmp_path: Path) -> None:
    """A hand-made upper in the writable mount's format: the upper file is an empty
    stub marked metacopy, the mount shows the real bytes; hidden xattrs stay out."""
    store = open_store(str(tmp_path / "store"))
    upper, merged = tmp_path / "upper", tmp_path / "merged"
    _write(upper / "etc/passwd", "")
    os.setxattr(upper / "etc/passwd", "trusted.layerfs.metacopy", b'{"origin":"etc/passwd"}')
    os.setxattr(upper / "etc", "trusted.layerfs.ino", b"7")
    os.mknod(upper / "gone", stat.S_IFCHR | 0o000, 0)
    _write(merged / "etc/passwd", "root:x:0:0::/root:/bin/sh\n", 0o600)
    os.setxattr(merged / "etc/passwd", "user.kept", b"1")
    entries = build_changeset(store, upper, merged, {})
    assert [(e.kind, e.path) for e in entries] == [
        (Kind.WHITEOUT, "gone"),
        (Kind.DIR, "etc"),
        (Kind.FILE, "etc/passwd"),
    ]
    passwd = entries[2]
    assert passwd.size == 26 and passwd.mode == 0o600
    assert passwd.xattrs == {"user.kept": b"1"}
    assert [i.path for i in scan_upper(upper, merged) if i.whiteout] == ["gone"]


def test_link_to_unchanged_lower_file_brings_the_lower_name(tmp_path: Path) -> None:
    """A new name linked to a lower file the upper does not hold: the lower name is
    re-emitted with its parents so the link target is inside the layer."""
    store = open_store(str(tmp_path / "store"))
    upper, merged = tmp_path / "upper", tmp_path / "merged"
    _write(merged / "usr/bin/tool", "#!/bin/sh\n", 0o755)
    os.link(merged / "usr/bin/tool", merged / "tool2")
    upper.mkdir()
    (upper / "tool2").write_text("#!/bin/sh\n")
    lower = {
        "usr": Entry("usr", Kind.DIR, 0o755),
        "usr/bin": Entry("usr/bin", Kind.DIR, 0o755),
        "usr/bin/tool": Entry("usr/bin/tool", Kind.FILE, 0o755, size=10),
    }
    entries = build_changeset(store, upper, merged, lower)
    assert [(e.kind, e.path, e.target) for e in entries] == [
        (Kind.FILE, "tool2", ""),
        (Kind.DIR, "usr", ""),
        (Kind.DIR, "usr/bin", ""),
        (Kind.HARDLINK, "usr/bin/tool", "tool2"),
    ]


def test_small_files_are_kept_inline(tmp_path: Path) -> None:
    """Files up to INLINE_MAX bytes go into the record itself, as an import keeps them;
    larger ones are chunked. An overlayfs metacopy file takes its lower file's content:
    a small one's bytes, a large one's chunks, nothing read again; a renamed one (with a
    redirect) is read through the mount."""
    store = open_store(str(tmp_path / "store"))
    upper = tmp_path / "upper"
    _write(upper / "small", "s" * 10)
    (upper / "edge").write_bytes(b"e" * INLINE_MAX)
    (upper / "over").write_bytes(b"o" * (INLINE_MAX + 1))
    (upper / "empty").write_bytes(b"")
    with open(upper / "meta", "wb") as f:
        f.truncate(5)
    os.setxattr(upper / "meta", "trusted.overlay.metacopy", b"")
    big = os.urandom(300_000)
    with open(upper / "bigmeta", "wb") as f:
        f.truncate(len(big))
    os.setxattr(upper / "bigmeta", "trusted.overlay.metacopy", b"")
    with open(upper / "moved", "wb") as f:
        f.truncate(5)
    os.setxattr(upper / "moved", "trusted.overlay.metacopy", b"")
    os.setxattr(upper / "moved", "trusted.overlay.redirect", b"/meta")
    mount = tmp_path / "mount"  # what the mount shows for the renamed one
    _write(mount / "moved", "hello")
    lower = {
        "meta": Entry("meta", Kind.FILE, size=5, inline=b"hello"),
        "bigmeta": Entry("bigmeta", Kind.FILE, size=len(big), chunks=store.write_bytes(big)),
    }
    stats = WriteStats()
    entries = build_changeset(store, upper, mount, lower, stats, upper_exact=True)
    e = {x.path: x for x in entries}
    assert (e["small"].inline, e["edge"].inline, e["empty"].inline) == (b"s" * 10, b"e" * 1024, b"")
    assert e["meta"].inline == b"hello" and e["meta"].size == 5
    assert e["moved"].inline == b"hello"
    assert e["over"].inline is None and read_content(store, e["over"]) == b"o" * 1025
    assert e["bigmeta"].chunks == lower["bigmeta"].chunks and e["bigmeta"].size == len(big)
    assert not any(x.chunks for x in entries if x.inline is not None)
    assert stats.chunks == 1, "only the one large new file was chunked"
    buf = io.BytesIO()
    write_layer(entries, store, buf)
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tar:
        assert tar.extractfile("meta").read() == b"hello"
        assert tar.extractfile("bigmeta").read() == big
