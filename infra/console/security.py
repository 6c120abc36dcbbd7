"""Sessions, CSRF tokens and form bodies of the console.

A session is a signed cookie: base64url JSON ``{key id, expiry, nonce}`` and its
HMAC-SHA256 under the console's secret. It expires at the time it carries, however
often it is used; every request also looks the token's operator up, so a revoked
token signs its sessions out at once and the role is always the stored one. A form's
CSRF token is an HMAC of the session's nonce (of a pre-session cookie's nonce on the
sign-in form): a page of another site can neither read it nor make it, and the
cookie is `SameSite=Strict` besides.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs

SESSION_COOKIE = "compensa_session"
PRESESSION_COOKIE = "compensa_signin"
#: A form body larger than this is refused (a merge patch of one payload is small).
MAX_FORM_BYTES = 2 * 1024 * 1024


@dataclass(frozen=True)
class Session:
    key_id: str
    expires: float
    nonce: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """Signs and checks sessions and CSRF tokens with one secret."""

    def __init__(self, secret: str | bytes) -> None:
        self.key = secret.encode() if isinstance(secret, str) else secret

    def _mac(self, purpose: str, data: str) -> str:
        return hmac.new(self.key, f"{purpose}|{data}".encode(), hashlib.sha256).hexdigest()

    def issue(self, key_id: str, now: datetime, lifetime_seconds: float) -> tuple[str, Session]:
        session = Session(key_id, now.timestamp() + lifetime_seconds, secrets.token_urlsafe(16))
        body = _b64(json.dumps({"k": session.key_id, "e": session.expires, "n": session.nonce}).encode())
        return f"{body}.{self._mac('session', body)}", session

    def read(self, cookie: str | None, now: datetime) -> Session | None:
        """The session a cookie holds, or None: missing, forged, malformed or expired."""
        if not cookie or len(cookie) > 4096 or "." not in cookie:
            return None
        body, _, mac = cookie.rpartition(".")
        if not hmac.compare_digest(mac, self._mac("session", body)):
            return None
        try:
            data = json.loads(_unb64(body))
            session = Session(str(data["k"]), float(data["e"]), str(data["n"]))
        except (ValueError, KeyError, TypeError, binascii.Error):
            return None
        return session if now.timestamp() < session.expires else None

    def csrf(self, nonce: str) -> str:
        return self._mac("csrf", nonce)

    def csrf_ok(self, nonce: str | None, token: str | None) -> bool:
        return bool(nonce and token) and hmac.compare_digest(self.csrf(nonce or ""), token or "")


class FormError(ValueError):
    """A form body the console will not read."""


def parse_form(body: bytes, content_type: str | None) -> dict[str, list[str]]:
    """An `application/x-www-form-urlencoded` body as lists of values per name."""
    if len(body) > MAX_FORM_BYTES:
        raise FormError(f"the form is larger than {MAX_FORM_BYTES:,} bytes")
    if body and (content_type or "").split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
        raise FormError("forms are sent as application/x-www-form-urlencoded")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormError("the form is not UTF-8") from exc
    try:
        return parse_qs(text, keep_blank_values=True, strict_parsing=False, max_num_fields=20_000)
    except ValueError as exc:
        raise FormError(str(exc)) from exc


def first(form: dict[str, list[str]], name: str, default: str = "") -> str:
    values = form.get(name)
    return values[0] if values else default


def as_json_text(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)
