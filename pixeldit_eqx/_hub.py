"""Weights by name: `hf://owner/repo[@revision]/path/in/repo` -> a file in the Hugging Face cache.

Resolved by `huggingface_hub.hf_hub_download` (the `hub` extra), so its cache
(`HF_HUB_CACHE`, `HF_HOME`) and offline mode (`HF_HUB_OFFLINE=1`: only what the cache
holds) apply; both variables are read when a file is resolved, not when the package is
imported.
"""

import os
import re
from typing import TypeGuard

from ._optional import require


SCHEME = "hf://"

_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HUB_ID = re.compile(rf"^hf://(?P<repo>{_REPO_PART}/{_REPO_PART})(?:@(?P<revision>[^/]+))?/(?P<file>[^@].*)$")


def is_hub_id(source: object) -> TypeGuard[str]:
    """Whether `source` is a string naming a file on the Hub (`hf://...`)."""
    return isinstance(source, str) and source.startswith(SCHEME)


def parse_hub_id(spec: str) -> tuple[str, str, str | None]:
    """`hf://owner/repo[@revision]/path/in/repo` -> `(repo_id, filename, revision or None)`."""
    m = _HUB_ID.match(spec)
    if m is None or any(part in ("", ".", "..") for part in m["file"].split("/")):
        raise ValueError(
            f"expected a Hugging Face file id `hf://owner/repo/path/in/repo` (optionally "
            f"`hf://owner/repo@revision/path`), got {spec!r}."
        )
    return m["repo"], m["file"], m["revision"]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_download(spec: str) -> str:
    """The local path of the Hub file `spec` names, downloaded into the Hugging Face cache
    unless it is there already (with `HF_HUB_OFFLINE` set, the cache alone is used).

    Raises `ValueError` for a malformed id and `FileNotFoundError` when the file cannot be
    had (not on the Hub, not cached while offline, no network).
    """
    repo_id, filename, revision = parse_hub_id(spec)
    hub = require("huggingface_hub", "hub", f"reading {spec!r} from the Hugging Face Hub")
    offline = _offline()
    try:
        return hub.hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
            local_files_only=offline,
        )
    except Exception as e:  # huggingface_hub's errors (HTTP, offline, missing entry) share no base class
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        where = "the Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "the Hugging Face Hub"
        raise FileNotFoundError(
            f"cannot get {spec!r} from {where}: {type(e).__name__}" + (f": {reason[:300]}" if reason else "")
        ) from e
