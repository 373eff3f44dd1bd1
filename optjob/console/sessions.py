"""Signing in to the console with an access key and its secret, kept as a server-side session.

The secret is checked once, at sign-in, against the same principals the API verifies signatures
with, and is then forgotten: the browser holds only a random token in an HttpOnly, SameSite=Strict
cookie, and the store holds only that token's SHA-256 (so a copy of the database signs nobody in),
the key id, the region and a CSRF token that every form that changes something must echo.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from optjob.api.principals import Principal
from optjob.jobs.store import ConsoleSession, Store
from optjob.jobs.tenancy import Caller

COOKIE = "optjob_console"


@dataclass(frozen=True)
class SignedIn:
    """Who is looking: the caller every operation acts for, and what the page may offer."""

    caller: Caller
    principal: str
    can_write: bool
    csrf_token: str
    token_sha256: str | None  # None without authentication (--no-auth): nothing to sign out of


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_secret(principals: dict[str, Principal], access_key_id: str, secret: str) -> Principal | None:
    """The principal whose key and secret these are, or None (the same answer for an unknown key and
    a wrong secret, compared in constant time, so the form tells an attacker nothing)."""
    principal = principals.get(access_key_id.strip())
    expected = principal.secret_access_key if principal else secrets.token_hex(16)
    if hmac.compare_digest(expected.encode(), secret.encode()) and principal is not None:
        return principal
    return None


def open_session(store: Store, principal: Principal, region: str, *, now: float, hours: float) -> str:
    """Record a new session; returns the cookie's token (shown to nobody else, stored only hashed)."""
    token = secrets.token_urlsafe(32)
    store.create_session(
        ConsoleSession(
            token_sha256=token_hash(token),
            access_key_id=principal.access_key_id,
            region=region,
            csrf_token=secrets.token_urlsafe(24),
            created=now,
            expires=now + hours * 3600,
        )
    )
    return token


def signed_in(store: Store, principals: dict[str, Principal], token: str | None, *, now: float) -> SignedIn | None:
    """The session behind a cookie, if it is live and its key still exists (a key removed from the
    credentials file ends its sessions at once)."""
    if not token:
        return None
    digest = token_hash(token)
    session = store.get_session(digest, now=now)
    if session is None:
        return None
    principal = principals.get(session.access_key_id)
    if principal is None:
        return None
    return SignedIn(
        caller=Caller(principal.account_id, session.region, principal.name),
        principal=principal.name,
        can_write=principal.console_write,
        csrf_token=session.csrf_token,
        token_sha256=digest,
    )
