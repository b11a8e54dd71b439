"""Where a base model's weights are on this worker's disk."""

from __future__ import annotations

import logging
from pathlib import Path

from common.storage import storage_from_url
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)

_COMPLETE_MARKER = ".loraplex-complete"


class BaseModelUnavailable(Exception):
    pass


def local_model_path(settings: WorkerSettings, name: str, source: str) -> str:
    """A local folder for the model: the source itself, or an s3:// copy cached on disk.

    A hub id is returned unchanged; transformers resolves it (offline deployments register
    folders or s3:// prefixes instead).
    """
    if source.startswith("s3://"):
        target = settings.data_dir / "model-cache" / name.replace("/", "--")
        if not (target / _COMPLETE_MARKER).exists():
            _download_prefix(settings, source, target)
        return str(target)
    if "://" in source:
        raise BaseModelUnavailable(f"unsupported model source {source!r}")
    path = Path(source)
    if path.is_absolute() or source.startswith("."):
        if not (path / "config.json").is_file():
            raise BaseModelUnavailable(
                f"base model {name!r}: folder {source} is missing or has no config.json"
            )
        return str(path)
    return source  # a hub id


def _download_prefix(settings: WorkerSettings, source: str, target: Path) -> None:
    store = storage_from_url(source, s3_endpoint_url=settings.s3_endpoint_url)
    keys = store.list_keys("")
    if not keys:
        raise BaseModelUnavailable(f"no objects under {source}")
    target.mkdir(parents=True, exist_ok=True)
    for key in keys:
        dest = target / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        store.download_file(key, dest)
    (target / _COMPLETE_MARKER).write_text("ok")
    log.info("cached base model from %s into %s", source, target)
