"""`layerfs cache`: what the content cache holds, and emptying it of what no mount uses."""

from __future__ import annotations

import click

from layerfs.store import open_store


@click.group("cache")
def cache_group() -> None:
    """The content cache: file bytes the kernel reads for mounted images.

    Each mounted image's view fills it in the background; after a fill, contents
    no mounted image uses are evicted, least recently used first, while the cache
    is over $LAYERFS_CACHE_MAX (default 20G). Contents of mounted images are
    never evicted.
    """


@cache_group.command("usage")
@click.pass_obj
def usage_command(store_url: str) -> None:
    """Show the content cache's size and the images mounted from it."""
    from layerfs.clitools import human_bytes
    from layerfs.fs.views import content_cache, live_views

    store = open_store(store_url)
    cache = content_cache(store)
    used = cache.usage()
    click.echo(f"content cache {cache.root}: {used.files} contents, {human_bytes(used.bytes)}")
    for view in live_views(store.backend.cache_dir()):
        click.echo(f"mounted: {view.image} ({view.image_id[:19]}) view {view.path}")


@cache_group.command("prune")
@click.option(
    "--max-size",
    default="0",
    show_default=True,
    help="Keep at most this much (e.g. 10G); 0 removes every content no mounted image uses.",
)
@click.pass_obj
def prune_command(store_url: str, max_size: str) -> None:
    """Evict contents no mounted image uses, least recently used first."""
    from layerfs.clitools import human_bytes, parse_size
    from layerfs.fs.views import content_cache, contents_in_use

    try:
        limit = parse_size(max_size)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--max-size") from None
    store = open_store(store_url)
    cache = content_cache(store)
    removed = cache.evict(limit, contents_in_use(store.backend.cache_dir()))
    left = cache.usage()
    click.echo(
        f"evicted {removed.files} contents ({human_bytes(removed.bytes)}); "
        f"{left.files} left ({human_bytes(left.bytes)})"
    )


COMMANDS = [cache_group]
