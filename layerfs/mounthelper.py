"""`mount.fuse.layerfs`: the helper mount(8) runs for `mount -t fuse.layerfs SOURCE DIR -o OPTS`.

mount(8) calls ``mount.fuse.layerfs SOURCE MOUNTPOINT [-n] [-s] [-f] [-v] -o OPTIONS``.
With ``lowerdir=A:B`` in OPTIONS the directories are mounted with kernel
overlayfs (SOURCE is only a label): ``upperdir=U,workdir=W`` make it writable,
``ro`` or no upperdir make it read-only. Without lowerdir, SOURCE names an
image of the store (option ``store=PATH``, else the default store), writable
with ``upper=DIR``.
Generic mount options (rw, defaults, noatime, dev, suid, ...) are accepted and
ignored. The helper returns once the mount answers; errors go to stderr as one
line with exit status 32 (mount failure), as mount(8) expects.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from layerfs.errors import LayerfsError
from layerfs.memory import return_large_buffers

USAGE = "usage: mount.fuse.layerfs SOURCE MOUNTPOINT [-o lowerdir=A:B,upperdir=U,workdir=W]"
EXIT_USAGE = 1
EXIT_FAILURE = 32
_OURS = ("lowerdir", "upperdir", "workdir", "upper", "store")


@dataclass
class HelperArgs:
    """What mount(8) asked for."""

    source: str
    mountpoint: str
    options: dict[str, str] = field(default_factory=dict)
    readonly: bool = False


def parse_args(argv: list[str]) -> HelperArgs:
    """Parse the helper's command line (as mount(8) builds it)."""
    positional: list[str] = []
    raw_options: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "-o":
            if i + 1 >= len(argv):
                raise ValueError("-o needs an option list")
            raw_options.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("-o"):
            raw_options.append(arg[2:])
        elif arg in ("-t",):
            i += 1  # the type; ours is implied
        elif arg.startswith("-"):
            pass  # -n (no mtab), -s (sloppy), -f (fake), -v (verbose)
        else:
            positional.append(arg)
        i += 1
    if len(positional) != 2:
        raise ValueError(USAGE)
    args = HelperArgs(positional[0], positional[1])
    for group in raw_options:
        for item in group.split(","):
            name, eq, value = item.partition("=")
            if name == "ro":
                args.readonly = True
            elif name == "rw":
                args.readonly = False
            elif name in _OURS:
                if not eq or not value:
                    raise ValueError(f"option {name} needs a value ({name}=...)")
                args.options[name] = value
    return args


def run(args: HelperArgs) -> None:
    """Mount what ``args`` describe; LayerfsError on failure."""
    opts = args.options
    store = opts.get("store")
    if "lowerdir" in opts:
        from layerfs.fs.service import mount_dirs

        upperdir = None if args.readonly else opts.get("upperdir")
        workdir = None if args.readonly else opts.get("workdir")
        if (upperdir is None) != (workdir is None):
            raise LayerfsError("overlay mount: upperdir and workdir go together")
        mount_dirs(
            [Path(p) for p in opts["lowerdir"].split(":")],
            Path(args.mountpoint),
            Path(upperdir) if upperdir else None,
            Path(workdir) if workdir else None,
        )
        return
    from layerfs.cli import cli

    argv = ["--store", store] if store else []
    argv += ["mount", args.source, args.mountpoint]
    if "upper" in opts and not args.readonly:
        argv += ["--upper", opts["upper"]]
    cli.main(argv, standalone_mode=False)


def main(argv: list[str] | None = None) -> None:
    return_large_buffers()
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
    except ValueError as exc:
        print(f"mount.fuse.layerfs: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    try:
        run(args)
    except LayerfsError as exc:
        print(f"mount.fuse.layerfs: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_FAILURE)
    except OSError as exc:
        print(f"mount.fuse.layerfs: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_FAILURE)
