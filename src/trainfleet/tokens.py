"""Per-host worker tokens and one-time enrollment codes: their format, hashing, and lifetimes.

Standard library only: the CLI mints nothing itself, but parses TTLs and names token kinds,
and the receiver hashes what it is shown. Only sha256 hashes of tokens are ever stored.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from enum import StrEnum

#: Prefixes make a leaked token recognisable (and greppable) for what it is.
PREFIX = {"worker": "tfw_", "enroll": "tfe_"}
DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DEFAULT_ENROLL_TTL_S = 24 * 3600.0


class TokenKind(StrEnum):
    WORKER = "worker"  #: a host's long-lived worker token; binds its holder to the host
    ENROLL = "enroll"  #: a one-time code, exchanged once for a worker token


def new_token(kind: TokenKind) -> str:
    """A fresh random token of this kind: its prefix and 256 bits (128 for a code)."""
    nbytes = 32 if kind is TokenKind.WORKER else 16
    return PREFIX[kind.value] + secrets.token_urlsafe(nbytes)


def hash_token(token: str | bytes) -> str:
    """The sha256 hex under which a token is stored and looked up.

    A header arrives as latin-1 text; hashing its bytes lets any header be looked up (and
    refused) without an encoding error, and the lookup by hash needs no constant-time compare.
    """
    raw = token.encode("latin-1", "replace") if isinstance(token, str) else token
    return hashlib.sha256(raw).hexdigest()


def token_id(token_hash: str) -> str:
    """The short, public name of a token in listings: a prefix of its hash, never the token."""
    return token_hash[:12]


def parse_duration(text: str) -> float:
    """Seconds from "90", "90s", "15m", "24h", "7d" or "2w"; ValueError names the format."""
    match = DURATION.match(text)
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"expected a positive duration such as 90s, 15m, 24h or 7d, got {text!r}")
    return float(match.group(1)) * UNIT_S[match.group(2)]
