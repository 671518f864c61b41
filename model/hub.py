"""Hub ids (``owner/name``) of exported models, resolved to local folders by huggingface_hub.

Kept free of heavy imports: the jobs use :func:`is_hub_id` while parsing their flags.
"""

from __future__ import annotations

import os
import re

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(name: str) -> bool:
    """``owner/name`` that is not a local path: a model to look up in the Hugging Face cache (or the Hub)."""
    return bool(_REPO_ID.fullmatch(name)) and not os.path.exists(name) and not name.endswith((".pth", ".pt", ".safetensors"))


def resolve(name_or_path: str, *, revision: str | None = None, cache_dir: str | None = None, local_files_only: bool = False,
            force_download: bool = False, token: str | bool | None = None) -> str:  # fmt: skip
    """The local folder of an export: ``name_or_path`` itself, or a hub id's snapshot.

    A hub id is resolved by ``huggingface_hub.snapshot_download``: from its cache when
    ``local_files_only`` or offline (``HF_HUB_OFFLINE=1``, read by huggingface_hub), else
    downloaded (or refreshed) from the Hub.
    """
    if os.path.isdir(name_or_path):
        return name_or_path
    if not is_hub_id(name_or_path):
        raise FileNotFoundError(f"{name_or_path}: no such model folder (nor an owner/name model id)")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                                 force_download=force_download, token=token)  # fmt: skip
    except (LocalEntryNotFoundError, HfHubHTTPError) as err:
        where = cache_dir or constants.HF_HUB_CACHE
        raise FileNotFoundError(
            f"{name_or_path}: no such local folder, and no model of that id in the Hugging Face cache {where} "
            f"({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from err
