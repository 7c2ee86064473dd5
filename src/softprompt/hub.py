"""The Hugging Face hub for prompts: a checkpoint folder is a hub model repo as it is, pushed with
`huggingface_hub`'s `upload_folder` and fetched with `snapshot_download` (KB: the prompt, a head, softprompt.json;
an exported peft adapter too). Whether the hub can be reached is found before any of the client's retries."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import huggingface_hub

from . import assets
from .checkpoint import read_checkpoint
from .errors import SoftpromptError


def _hub_reason(err: Exception) -> str:
    return str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__


def local_folder(checkpoint: str | Path) -> Path:
    """A checkpoint folder as given, or a hub repo id (`user/name`) fetched into the local hub cache."""
    path = Path(checkpoint).expanduser()
    if path.exists() or str(checkpoint).count("/") != 1:
        return path
    reason = assets.hub_unreachable()
    if reason is None:
        try:
            return Path(huggingface_hub.snapshot_download(str(checkpoint)))
        except Exception as err:  # the hub client raises many types; all mean the same to the user
            reason = _hub_reason(err)
    raise SoftpromptError(f"{checkpoint} is neither a checkpoint folder nor a hub repo reachable now ({reason})")


def push_folder(folder: str | Path, repo_id: str, private: bool | None = None, token: str | None = None,
                commit_message: str = "softprompt checkpoint") -> str:
    """Upload a checkpoint folder (checked first) to the hub model repo `repo_id`, created if need be; returns the
    commit's URL."""
    read_checkpoint(folder)
    reason = assets.hub_unreachable()
    if reason is not None:
        raise SoftpromptError(f"cannot push to {repo_id}: the hub is not reachable now ({reason})")
    api = huggingface_hub.HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        return str(api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message))
    except Exception as err:  # authentication, permissions, network: one line either way
        raise SoftpromptError(f"cannot push to {repo_id} ({_hub_reason(err)})") from None


def push_saved(save: Callable[[Path], object], repo_id: str, private: bool | None = None, token: str | None = None,
               commit_message: str = "softprompt checkpoint") -> str:
    """`save` a checkpoint into a temporary folder, then `push_folder` it."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "checkpoint"
        save(folder)
        return push_folder(folder, repo_id, private, token, commit_message)
