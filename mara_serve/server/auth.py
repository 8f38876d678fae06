"""Bearer-key authentication: the API key guards /v1/*, the admin key guards /admin/*.

Keys are compared in constant time (`hmac.compare_digest`) so response timing says nothing
about how much of a guess was right. /health, /ready and /metrics stay open (probes and
Prometheus scrape them without credentials). Without an admin key the admin API is disabled
and answers 403, so a forgotten key never leaves agent loading open.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from pydantic import SecretStr

from mara_serve.server.errors import AuthenticationError, PermissionDeniedError


def bearer_token(request: Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def key_matches(token: str | None, key: SecretStr) -> bool:
    if token is None:
        return False
    return hmac.compare_digest(token.encode(), key.get_secret_value().encode())


def require_api_key(request: Request) -> None:
    """Dependency of /v1/*: a no-op when no API key is configured."""
    key = request.app.state.mara.settings.api_key
    if key is None:
        return
    token = bearer_token(request)
    if token is None:
        raise AuthenticationError(
            "missing API key: send 'Authorization: Bearer <key>' (the server's MARA_API_KEY)"
        )
    if not key_matches(token, key):
        raise AuthenticationError("incorrect API key provided")


def require_admin_key(request: Request) -> None:
    """Dependency of /admin/*: 403 while the admin API is disabled, 401 on a wrong key."""
    key = request.app.state.mara.settings.admin_key
    if key is None:
        raise PermissionDeniedError(
            "the admin API is disabled: start the server with --admin-key (MARA_ADMIN_KEY)",
            code="admin_api_disabled",
        )
    token = bearer_token(request)
    if token is None:
        raise AuthenticationError("missing admin key: send 'Authorization: Bearer <admin key>'")
    if not key_matches(token, key):
        raise AuthenticationError("incorrect admin key provided")


ApiKey = Annotated[None, Depends(require_api_key)]
AdminKey = Annotated[None, Depends(require_admin_key)]
