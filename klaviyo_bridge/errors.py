"""Error tree of the bridge; every client translates its failures into these at the boundary.

    BridgeError
    ├── ConfigError(problems)            bad TOML or secrets: exit 78
    ├── StoreError                        state DB unusable (corrupt, newer schema)
    ├── MalformedOrder(order_id, why, excerpt)   one Whiplash order we cannot read
    └── UpstreamError(service, status, detail)
        ├── TransientUpstream(retry_after)        429, 5xx, timeouts, resets: retry later
        │   └── RateLimited                       429 specifically
        ├── MalformedPayload(excerpt)             a whole response we cannot read (HTML, bad JSON)
        ├── AuthFailed                            401/403: credentials refused
        └── PermanentUpstream                     other 4xx: the request itself is refused

Messages never carry secrets: clients build them from status codes and response bodies only.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Base of every error the bridge raises on purpose."""


class ConfigError(BridgeError):
    """The configuration cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class StoreError(BridgeError):
    """The state database cannot be used safely."""


class MalformedOrder(BridgeError):
    """One Whiplash order lacks or mistypes a field the bridge needs."""

    def __init__(self, order_id: int | None, why: str, excerpt: str) -> None:
        super().__init__(f"order={order_id} {why}: {excerpt}")
        self.order_id = order_id
        self.why = why
        self.excerpt = excerpt


class UpstreamError(BridgeError):
    """A remote API failed; ``status`` is the HTTP status or None for network errors."""

    def __init__(self, service: str, status: int | None, detail: str) -> None:
        super().__init__(f"{service} {status if status is not None else 'network'}: {detail}")
        self.service = service
        self.status = status
        self.detail = detail


class TransientUpstream(UpstreamError):
    """A failure worth retrying; ``retry_after`` is the server's hint in seconds, if any."""

    def __init__(self, service: str, status: int | None, detail: str, retry_after: float | None = None) -> None:
        super().__init__(service, status, detail)
        self.retry_after = retry_after


class RateLimited(TransientUpstream):
    """HTTP 429: the account's quota is used up for now."""


class MalformedPayload(UpstreamError):
    """A response body that is not the JSON the API documents."""


class AuthFailed(UpstreamError):
    """Credentials refused (401/403); retrying the same request will not help."""


class PermanentUpstream(UpstreamError):
    """The request was refused for what it is (400/404/409/422...); ``body`` is the response text."""

    def __init__(self, service: str, status: int | None, detail: str, body: str = "") -> None:
        super().__init__(service, status, detail)
        self.body = body
