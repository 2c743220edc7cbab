"""SQLite state (STUB: the store helper replaces this file; the record types below are the contract)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

RowKind = Literal["profile", "event"]


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """The Whiplash OAuth tokens; ``refresh_token`` must never be lost once rotated."""

    access_token: str
    expires_at: datetime  # UTC
    refresh_token: str | None
    seed_fingerprint: str  # sha256 of the refresh token from config that this chain started from


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One queued delivery."""

    id: int
    customer_id: int
    kind: RowKind
    key: str  # unique_id for events, email for profiles
    payload: str  # JSON text, sent byte-for-byte on every attempt
    version: int  # bumped when a queued profile row is replaced; mark_sent only matches this version
    attempts: int
