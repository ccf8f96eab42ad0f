"""`imgcls cache list` and `imgcls cache clear`: the decoded-image cache."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from imgcls.cli.app import command, stderr, stdout
from imgcls.cli.render import cache_table


@command
def cache_list(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list on stdout.")] = False,
) -> None:
    """List cached decoded splits, most recently used first.

    The table shows each key's first 12 characters (any unique prefix names
    an entry for `imgcls cache clear`; --json has the whole key) and wraps
    long sources rather than cutting them.

    Examples:

        imgcls cache list

        imgcls cache list --json
    """

    from imgcls.data.cache import cache_max, default_cache_dir, human_bytes, list_entries
    from imgcls.text import json_safe

    entries = list_entries()
    if as_json:
        print(json.dumps(json_safe(entries), indent=2))
        return
    stdout().print(cache_table(entries, human_bytes))
    total = sum(e["bytes"] for e in entries)
    stderr().print(
        f"{len(entries)} entries, {human_bytes(total)} of {human_bytes(cache_max())} (IMGCLS_CACHE_MAX) in {default_cache_dir()}",
        markup=False,
    )


@command
def cache_clear(
    keys: Annotated[
        list[str] | None, typer.Argument(help="Entry keys (or unique prefixes) to remove.")
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Remove every entry.")] = False,
) -> None:
    """Remove cached decoded splits (named ones, or --all); the next run decodes again.

    Examples:

        imgcls cache clear --all

        imgcls cache clear 3f9a1c
    """
    from imgcls.data.cache import clear_entries, default_cache_dir, human_bytes
    from imgcls.errors import UsageError

    if bool(keys) == all_:
        raise UsageError("name entry keys to remove, or pass --all (not both)")
    removed, freed, kept = clear_entries(keys or ())
    in_use = f"; kept {kept} in use by a running process" if kept else ""
    stderr().print(
        f"removed {removed} cache entries, freed {human_bytes(freed)} in {default_cache_dir()}{in_use}",
        markup=False,
    )
