"""The Celery broker connection used to publish work, with idempotent publishing on Redis.

The outbox dispatcher may publish a row and die before recording that it did; on restart it
publishes the row again. To keep that from putting a second message on the queue, every
message published from the outbox carries a task id derived from the outbox row, and on Redis
the message is pushed by a Lua script that first claims a dedup key for that task id: the
claim and the push happen atomically, so a second publish of the same row is a no-op.
(The consumers' atomic claim with attempt fencing makes a duplicate harmless anyway; this makes
it absent.)
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

# Task ids starting with this prefix are deduplicated (see module docstring).
DEDUP_TASK_PREFIX = "outbox-"
DEDUP_KEY_PREFIX = "loraplex:published:"
DEDUP_TTL_SECONDS = 7 * 24 * 3600

_PUSH_ONCE = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then
  redis.call('LPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
"""


class DedupChannel(kombu_redis.Channel):
    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        task_id = str(message.get("headers", {}).get("id") or "")
        if not task_id.startswith(DEDUP_TASK_PREFIX) or self._expires:
            super()._put(queue, message, **kwargs)
            return
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        with self.conn_or_acquire() as client:
            client.eval(
                _PUSH_ONCE,
                2,
                DEDUP_KEY_PREFIX + task_id,
                key,
                dumps(message),
                DEDUP_TTL_SECONDS,
            )


class DedupRedisTransport(kombu_redis.Transport):
    Channel = DedupChannel


def make_publisher(broker_url: str) -> Celery:
    """A Celery app that only sends tasks by name (it never imports the task code)."""
    app = Celery("loraplex-publisher", broker=broker_url, set_as_current=False)
    conf: dict[str, Any] = {
        "task_serializer": "json",
        "accept_content": ["json"],
        "broker_connection_retry_on_startup": True,
    }
    if broker_url.startswith(("redis://", "rediss://")):
        conf["broker_transport"] = f"{__name__}:DedupRedisTransport"
    app.conf.update(conf)
    return app
