"""The Hugging Face hub: telling a hub id from a local path, and listing / downloading a repository's files.

One rule for `export SOURCE` and `caption --model`. Downloads go through huggingface_hub's own cache
(`HF_HUB_CACHE`, `HF_HUB_OFFLINE` apply); offline, a repository already in that cache is used as it is.
No torch here: the runtime uses this module to fetch pre-exported model folders.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class HubError(Exception):
    """The hub cannot give what was asked; the message says why and what to do."""


def looks_like_path(text: str) -> bool:
    """True for anything a user means as a local path: it starts with ".", "~" or a separator, holds a
    backslash or other than one "/", ends with "/", exists, or its first part is a local folder
    ("models/pg-int4" when ./models exists)."""
    if text.startswith((".", "~", "/", "\\")) or "\\" in text or text.count("/") != 1 or text.endswith("/"):
        return True
    return Path(text).expanduser().exists() or Path(text.split("/", 1)[0]).is_dir()


def is_hub_id(text: str) -> bool:
    """True for "owner/name" (hub naming rules) that is not a local path (see `looks_like_path`)."""
    return not looks_like_path(text) and bool(_HUB_ID.match(text)) and ".." not in text and "--" not in text


def repo_files(repo: str) -> tuple[dict[str, int | None], bool]:
    """The repository's files with their sizes, and whether this comes from the local hub cache (offline:
    HF_HUB_OFFLINE, or the hub unreachable) rather than the hub. HubError when neither can say."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        info = HfApi().model_info(repo, files_metadata=True)
        return {s.rfilename: s.size for s in info.siblings or []}, False
    except GatedRepoError:
        raise HubError(f"{repo} is gated on the hub: accept its licence on its page and log in "
                       "(hf auth login), or pass --model with a local folder") from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo}: no such model on the hub (or it is private: log in with hf auth login)") from None
    except Exception:  # noqa: BLE001 - offline mode, no network, hub down (each client raises its own)
        folder = cached_snapshot(repo)
        return {str(p.relative_to(folder).as_posix()): p.stat().st_size
                for p in sorted(folder.rglob("*")) if p.is_file()}, True


def cached_snapshot(repo: str) -> Path:
    """The repository's folder in the local hub cache; HubError when it is not there."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise HubError(f"cannot reach the hub for {repo} (offline, or HF_HUB_OFFLINE is set) and it is not in "
                       "the local hub cache: run once with network access, or pass --model with a local folder") \
            from None


def download(repo: str, patterns: list[str], offline: bool) -> Path:
    """Download the repository's files matching `patterns` (fnmatch) into the hub cache; return the
    snapshot folder. Offline, the cached snapshot is returned as it is."""
    from huggingface_hub import snapshot_download

    if offline:
        return cached_snapshot(repo)
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, tqdm_class=_progress_class()))
    except Exception as exc:  # noqa: BLE001 - network and hub errors of every client library
        reason = " ".join(str(exc).split())[:200]
        raise HubError(f"downloading {repo} failed ({type(exc).__name__}: {reason}); run again to resume") from None


def _progress_class() -> type | None:
    """Download bars drawn by rich on a terminal (tqdm's rich front end); hub's plain bars otherwise."""
    if not sys.stderr.isatty():
        return None
    import warnings

    try:
        from tqdm import TqdmExperimentalWarning
        from tqdm.rich import tqdm as rich_tqdm
    except ImportError:
        return None
    warnings.filterwarnings("ignore", category=TqdmExperimentalWarning)
    return rich_tqdm
