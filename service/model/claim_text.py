"""How a server's claim and its check read for people (mail, CLI, in the
page's app.js too): standard library only, as the CLI is."""

from __future__ import annotations

from typing import Any

MIB = 1024 * 1024


def human_bytes(n: int) -> str:
    """8388608 -> '8 MiB'; sizes that are not whole MiB in bytes."""
    return f"{n // MIB} MiB" if n % MIB == 0 else f"{n} bytes"


def describe(server: dict[str, Any]) -> str:
    """``server_digest`` as one line: which claim, and how it went."""
    claim = f"{server['header']} ({server['algorithm']}"
    if server.get("parts"):
        claim += f" of {server['parts']} parts"
    claim += ")"
    verified = server.get("verified")
    if verified:
        how = f", with parts of {human_bytes(server['part_size'])}" \
            if server.get("part_size") else ""
        return f"verified against the server's {claim}{how}"
    if verified is False:
        return f"the server's {claim} does NOT match the bytes received"
    return f"the server's {claim} is unverified: {server.get('why') or 'no reason recorded'}"
