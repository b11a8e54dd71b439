"""Replica choice: adapter affinity, bounded load, failover (no network: health is set by hand)."""

from __future__ import annotations

import httpx
import pytest

from serving.replicas import NoReplica, ReplicaPool


def _pool(n: int, base: str = "tiny") -> ReplicaPool:
    pool = ReplicaPool([f"http://r{i}:8000" for i in range(n)], httpx.AsyncClient(), {})
    for replica in pool.replicas:
        replica.healthy, replica.base_model = True, base
    return pool


def test_same_adapter_same_replica_and_adapters_spread() -> None:
    pool = _pool(3)
    owners = {f"ft:tiny:acme::{i}": pool.choose("tiny", f"ft:tiny:acme::{i}") for i in range(60)}
    for name, replica in owners.items():
        assert pool.choose("tiny", name) is replica
    counts = [sum(1 for r in owners.values() if r is replica) for replica in pool.replicas]
    assert min(counts) >= 8, counts  # 60 adapters over 3 replicas: none starves


def test_bounded_load_moves_requests_off_a_hot_replica() -> None:
    pool = _pool(2)
    home = pool.choose("tiny", "hot-adapter")
    home.inflight = 10  # the other has none: 1.25 * 11 / 2 = 6.9 < 10
    other = pool.choose("tiny", "hot-adapter")
    assert other is not home
    home.inflight = 1
    assert pool.choose("tiny", "hot-adapter") is home


def test_failover_and_exclusion() -> None:
    pool = _pool(2)
    home = pool.choose("tiny", "a")
    home.healthy = False
    pool._rings.clear()  # health changes rebuild the ring (done by check())
    assert pool.choose("tiny", "a") is not home
    survivor = pool.choose("tiny", "a")
    with pytest.raises(NoReplica):
        pool.choose("tiny", "a", exclude=frozenset({survivor}))


def test_cooldown_after_failure_prefers_the_other_replica() -> None:
    pool = _pool(2)
    home = pool.choose("tiny", "b")
    home.mark_failed("connection refused")
    assert pool.choose("tiny", "b") is not home


def test_only_replicas_of_the_base_model_are_chosen() -> None:
    pool = _pool(2)
    pool.replicas[1].base_model = "other"
    for i in range(20):
        assert pool.choose("tiny", str(i)) is pool.replicas[0]
    with pytest.raises(NoReplica):
        pool.choose("missing", "x")
