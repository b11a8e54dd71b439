"""The model watch against a fake catalog: what it forgets, and when it reports."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from serving.app import _watch_models
from serving.cache import RefreshingCache


class _StuckPlacer:
    """Unloading from the replicas hangs (a replica's admin lock held by a long load)."""

    def __init__(self) -> None:
        self.retiring: list[str] = []

    async def retire(self, name: str) -> None:
        self.retiring.append(name)
        await asyncio.Event().wait()


def test_retired_models_answer_404_even_while_unloading_them_hangs() -> None:
    async def run() -> None:
        models: RefreshingCache[str] = RefreshingCache(ttl=0.01, max_stale=0.02, watched_ttl=60)
        for key in [("t1", "ft:a"), ("t2", "ft:b"), ("t3", "ft:c")]:
            await models.get(key, lambda: "live")
        catalog = SimpleNamespace(
            retired_since=lambda since: [("ft:a", "t1"), ("ft:b", "t2")],
            base_models=lambda: {"base": (True, 2048)},
        )
        placer = _StuckPlacer()
        gateway = SimpleNamespace(catalog=catalog, models=models, placer=placer)
        watch = asyncio.ensure_future(_watch_models(gateway, 0.05))  # type: ignore[arg-type]
        try:
            await asyncio.sleep(0.3)
            assert placer.retiring  # the unload is stuck...
            # ...yet both retirements were forgotten, and the watch keeps reporting.
            assert await models.get(("t1", "ft:a"), lambda: None) is None
            assert await models.get(("t2", "ft:b"), lambda: None) is None
            # A live model is still trusted well past the short bounds: the watch reports.
            assert await models.get(("t3", "ft:c"), lambda: "reloaded") == "live"
        finally:
            watch.cancel()

    asyncio.run(run())
