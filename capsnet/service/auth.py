"""Who may call what, for HTTP (middleware.Guard) and gRPC (the servicer) alike.

Three groups: the open one (health, metrics, docs; see CAPSNET_OPEN_*), inference (everything that
reads: predictions, metadata, the repository index), behind CAPSNET_API_KEY when it is set, and
management (loading and unloading models: what changes what the server serves), which is off unless
CAPSNET_MODEL_CONTROL=explicit and then needs CAPSNET_ADMIN_KEY, which the inference key never grants.
Triton ships the same way (`--model-control-mode=none`), so that one anonymous unload cannot take the
service down. Keys arrive as `Authorization: Bearer <key>` (gRPC: the `authorization` metadata) and are
compared in constant time.
"""

from __future__ import annotations

import hmac
import ipaddress

from pydantic import SecretStr

from capsnet.service.errors import APIError
from capsnet.service.settings import Settings

LOOPBACK_NAMES = ("localhost",)


MANAGEMENT_PREFIX = "/v2/repository/models/"  # + {name}/load, {name}/unload: routes/v2.py
MANAGEMENT_ACTIONS = ("load", "unload")


def management_route(path: str) -> str | None:
    """The route template of a path in the management group (HTTP), or None."""
    if not path.startswith(MANAGEMENT_PREFIX):
        return None
    name, _, action = path[len(MANAGEMENT_PREFIX) :].rpartition("/")
    if not name or "/" in name or action not in MANAGEMENT_ACTIONS:
        return None
    return f"{MANAGEMENT_PREFIX}{{name}}/{action}"


def secret(key: SecretStr | None) -> bytes | None:
    return key.get_secret_value().encode() if key is not None else None


def bearer_matches(authorization: str | bytes | None, key: bytes) -> bool:
    """`Bearer <key>`, the token compared in constant time."""
    if authorization is None:
        return False
    value = authorization.encode() if isinstance(authorization, str) else authorization
    scheme, _, token = value.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)


class ModelControl:
    """The management group's gate: CAPSNET_MODEL_CONTROL, then CAPSNET_ADMIN_KEY."""

    def __init__(self, settings: Settings) -> None:
        self.explicit = settings.model_control == "explicit"
        self.key = secret(settings.admin_key)

    def check(self, authorization: str | bytes | None, how: str) -> None:
        """APIError 403 while model control is off, 401 without the admin key (when one is set).
        `how`: how a client sends the key over its protocol, for the message."""
        if not self.explicit:
            raise APIError(403, "model control is off (CAPSNET_MODEL_CONTROL=none): the server serves "
                           "the models it started with; an operator can start it with "
                           "CAPSNET_MODEL_CONTROL=explicit and CAPSNET_ADMIN_KEY")  # fmt: skip
        if self.key is not None and not bearer_matches(authorization, self.key):
            raise APIError(401, f"loading and unloading models need the admin key (CAPSNET_ADMIN_KEY): {how}",
                           {"WWW-Authenticate": "Bearer"})  # fmt: skip


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost, or 0.0.0.0's kin: assume it is reachable


def startup_problem(settings: Settings, http_host: str) -> str | None:
    """Why these settings must not start a server listening on `http_host` (and CAPSNET_GRPC_HOST):
    the management group reachable from another host without a key, or the admin key that is also
    the inference key. None when they may."""
    admin, api = secret(settings.admin_key), secret(settings.api_key)
    if admin is not None and api is not None and hmac.compare_digest(admin, api):
        return "CAPSNET_ADMIN_KEY must differ from CAPSNET_API_KEY (inference clients must not manage models)"
    if settings.model_control != "explicit" or admin is not None:
        return None
    hosts = [http_host] + ([settings.grpc_host or http_host] if settings.grpc_port else [])
    exposed = [h for h in hosts if not is_loopback(h)]
    if not exposed:
        return None
    return (f"CAPSNET_MODEL_CONTROL=explicit without CAPSNET_ADMIN_KEY on {exposed[0]}: anyone who reaches "
            "it could unload the models; set CAPSNET_ADMIN_KEY, or listen on 127.0.0.1 only")  # fmt: skip
