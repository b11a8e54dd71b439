"""What the inference gateway reports about its vLLM replicas: its /readyz status, and the
detail from /internal/replicas, which answers only a request signed with the server secret
(the adapters loaded are every tenant's model names)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx

from common.internal_auth import REPLICAS_REQUEST, sign


@dataclass(frozen=True)
class Replica:
    url: str
    healthy: bool
    base_model: str | None
    adapters: list[str]
    inflight: int
    error: str | None


@dataclass(frozen=True)
class GatewayView:
    configured: bool
    status: str = ""
    error: str | None = None
    replicas: list[Replica] = field(default_factory=list)

    def where_loaded(self) -> dict[str, list[str]]:
        """Adapter (model) name -> the replicas that have it loaded."""
        found: dict[str, list[str]] = {}
        for replica in self.replicas:
            for adapter in replica.adapters:
                found.setdefault(adapter, []).append(replica.url)
        return found


def _replica(url: str, raw: Any) -> Replica:
    info = raw if isinstance(raw, dict) else {}
    adapters = info.get("adapters")
    return Replica(
        url=url,
        healthy=bool(info.get("healthy")),
        base_model=str(info["base_model"]) if info.get("base_model") else None,
        adapters=[str(a) for a in adapters] if isinstance(adapters, list) else [],
        inflight=int(info.get("inflight") or 0),
        error=str(info["error"])[:300] if info.get("error") else None,
    )


def fetch(gateway_url: str, secret_key: str, timeout: float = 2.0) -> GatewayView:
    """Ask the gateway; a gateway that is down or answers nonsense is shown, not raised."""
    if not gateway_url:
        return GatewayView(configured=False)
    base = gateway_url.rstrip("/")
    try:
        # /readyz answers 503 with the same body while no replica is healthy.
        ready = httpx.get(base + "/readyz", timeout=timeout).json()
        detail = httpx.get(
            base + "/internal/replicas", headers=sign(secret_key, REPLICAS_REQUEST), timeout=timeout
        ).json()
    except (httpx.HTTPError, ValueError) as exc:
        return GatewayView(configured=True, error=f"unreachable: {type(exc).__name__}")
    if not isinstance(ready, dict) or not isinstance(detail, dict):
        return GatewayView(configured=True, error="unexpected answer from the gateway")
    if "error" in detail:
        # A 404: the gateway does not hold the same LORAPLEX_SECRET_KEY as this API.
        return GatewayView(
            configured=True,
            status=str(ready.get("status", "")),
            error="refused the replica list (is LORAPLEX_SECRET_KEY the same here and there?)",
        )
    replicas = detail.get("replicas")
    return GatewayView(
        configured=True,
        status=str(ready.get("status", "")),
        replicas=[_replica(str(u), r) for u, r in replicas.items()]
        if isinstance(replicas, dict)
        else [],
    )
