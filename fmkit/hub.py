"""Models on the Hugging Face Hub: `--checkpoint org/name` and `Generator.from_pretrained(
"org/name")` read a model folder (what `fmkit export --format fmkit` writes, pushed to a repo)
through huggingface_hub's download and cache (the optional extra `fmkit[hub]`)."""

from __future__ import annotations

import re
from pathlib import Path

from fmkit.errors import FmkitError

# owner/name, optionally @revision (a branch, tag or commit)
REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(@(?P<revision>[\w./-]+))?$")
FILES = ["config.json", "model.safetensors"]  # a model folder: nothing else is fetched


def is_repo_id(source: str | Path) -> bool:
    """`source` names a Hub repo rather than a local path: it looks like owner/name and no
    such file or folder exists here."""
    return REPO_ID.match(str(source)) is not None and not Path(source).expanduser().exists()


def locate(source: str | Path, files: list[str] = FILES) -> Path:
    """A local path as it is; a Hub repo id: the folder of its snapshot in the Hugging Face
    cache with the `files` (glob patterns) it has, downloaded when missing or stale
    (HF_HUB_OFFLINE=1: the cache only). What cannot be had is one FmkitError."""
    if not is_repo_id(source):
        return Path(source).expanduser()
    match = REPO_ID.match(str(source))
    repo, revision = match["repo"], match["revision"]
    try:
        import huggingface_hub
        from huggingface_hub.errors import (
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise FmkitError(
            f"{source} is not a local path; to read it from the Hugging Face Hub, install "
            "huggingface_hub: pip install 'fmkit[hub]'"
        ) from None
    try:
        folder = huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=files)
    except LocalEntryNotFoundError:
        raise FmkitError(
            f"{source} is not a local path, nor in the Hugging Face cache "
            f"({huggingface_hub.constants.HF_HUB_CACHE}), and the Hub cannot be reached "
            f"(offline?): fetch it into that cache where there is a network (hf download "
            f"{repo}) or give a local folder"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise FmkitError(
            f"{source} is not a local path, nor a model repo on the Hugging Face Hub (or one "
            "you may read: log in with `hf auth login`)"
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FmkitError(f"{source}: the Hugging Face Hub download failed: {first}") from None
    return Path(folder)
