"""Who may call what: the authorisation policy file, and the caller's verified identity.

grpcio has no authorisation-policy engine for Python, so this is one: identities come from
the verified client certificate in the call's auth context (never from metadata the caller
sets), map to roles, and roles to fully qualified methods. Anything not granted is denied.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from service.errors import ServiceError

REQUIRED_TLS_VERSION = b"TLSv1.3"


class AuthzPolicyError(ValueError):
    """The policy file is invalid; the message names the entry."""


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


@dataclass(frozen=True)
class AuthzPolicy:
    version: str
    grants: Mapping[str, frozenset[str]]  # identity -> methods

    def check(self, identity: str | None, method: str, why: str = "") -> None:
        """Raise UNAUTHENTICATED without an identity (saying `why`, see `missing_identity`),
        PERMISSION_DENIED without a grant."""
        if identity is None:
            raise Unauthenticated(
                f"no verified client certificate identity: {why}"
                if why
                else "no verified client certificate identity"
            )
        if method not in self.grants.get(identity, frozenset()):
            raise PermissionDenied(f"{identity} may not call {method}")


def capability_name(method: str, capability: str) -> str:
    """How the policy file names a capability within a method: `/pkg.Service/Method#what`."""
    return f"{method}#{capability}"


def load_authz_policy(path: Path) -> AuthzPolicy:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AuthzPolicyError(f"authorisation policy {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise AuthzPolicyError(f"authorisation policy {path} is not valid TOML: {error}") from None
    version = document.get("version")
    roles, identities = document.get("roles"), document.get("identities")
    if not isinstance(version, str) or not version:
        raise AuthzPolicyError("authz.version must be a non-empty string")
    if not isinstance(roles, dict) or not isinstance(identities, dict):
        raise AuthzPolicyError("authz needs [roles] and [identities] tables")
    for role, methods in roles.items():
        if not isinstance(methods, list) or not all(
            isinstance(m, str) and m.startswith("/") and m.count("/") == 2 and m.count("#") <= 1
            for m in methods
        ):
            raise AuthzPolicyError(
                f"authz.roles.{role} must list methods as /package.Service/Method "
                "(or a capability within one, /package.Service/Method#capability)"
            )
    grants: dict[str, frozenset[str]] = {}
    for identity, granted_roles in identities.items():
        if not isinstance(granted_roles, list) or not all(r in roles for r in granted_roles):
            raise AuthzPolicyError(f"authz.identities.{identity} must list defined roles")
        grants[identity] = frozenset(m for r in granted_roles for m in roles[r])
    return AuthzPolicy(version, grants)


def missing_identity(auth_context: Mapping[str, Iterable[bytes]]) -> str:
    """Why a peer has no identity, for the caller to read: the usual cause is a client that
    offered TLS 1.2 (gRPC accepts the handshake; privscore then refuses every call)."""
    versions = [v.decode("ascii", "replace") for v in auth_context.get("ssl_tls_version", ())]
    if not versions:
        return "the connection is not mutual TLS"
    if REQUIRED_TLS_VERSION.decode() not in versions:
        return f"TLS 1.3 is required; this connection uses {', '.join(versions)}"
    return "the client certificate must carry exactly one SPIFFE URI SAN"


def peer_identity(auth_context: Mapping[str, Iterable[bytes]]) -> str | None:
    """The verified SPIFFE id of a TLS 1.3 peer, or None (plaintext, older TLS, or no URI SAN)."""
    if REQUIRED_TLS_VERSION not in auth_context.get("ssl_tls_version", ()):
        return None
    spiffe = list(auth_context.get("peer_spiffe_id", ()))
    return spiffe[0].decode("utf-8", "replace") if len(spiffe) == 1 else None
