"""What `softprompt serve`'s arguments stand for, and the model loaded from them: one base model, every prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..checkpoint import checkpoint_folder
from ..errors import SoftpromptError
from ..multitask import MultiTaskModel
from ..pipeline import read_task_checkpoint
from .options import ServeOptions
from .watcher import scan

Entry = tuple[str, "str | None", "str | None"]  # (checkpoint, task, member); None: the checkpoint's own name


def local_path(path: str) -> str:
    """A local checkpoint as an absolute path (the member name it gets does not depend on the server's working
    folder); anything else (a hub repo id) as given."""
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else path


def resolve_sources(sources: Sequence[str]) -> list[Entry]:
    """What `softprompt serve` arguments stand for: a checkpoint or run folder, NAME=PATH, a folder of
    checkpoints laid out as for --watch, or a hub repo id."""
    entries: list[Entry] = []
    for source in sources:
        name, path = None, source
        if "=" in source and not Path(source).expanduser().exists():
            name, path = source.split("=", 1)
        local = Path(path).expanduser()
        checkpoint = checkpoint_folder(local)
        if checkpoint:
            entries.append((local_path(str(checkpoint)), name or None, None))
        elif local.is_dir() and not name and (found := scan(local)):
            entries += [(local_path(str(p)), task, member) for (task, member), p in found.items()]
        elif not local.exists() and path.count("/") == 1:
            entries.append((path, name or None, None))  # a hub repo id, fetched by load
        else:
            raise SoftpromptError(f"{source}: not a checkpoint folder, a run folder, NAME=PATH, a folder of "
                                  "checkpoints, or a hub repo id")
    return entries


def load_model(sources: Sequence[str], options: ServeOptions | None = None) -> MultiTaskModel:
    """The base model of the first checkpoint (of `sources`, else of the watched folder) with every source's
    prompts added, each in its own precision unless `options.dtype` says one for all; the watched folder's own
    prompts are added by its watcher when the app starts."""
    options = options or ServeOptions()
    entries = resolve_sources(sources)
    watch = options.watch
    first = entries[0][0] if entries else next(iter(scan(watch).values()), None) if watch else None
    if first is None:
        raise SoftpromptError("nothing to serve: give a checkpoint, or a --watch folder that holds one")
    _, _, spec = read_task_checkpoint(first, options.trust_remote_code)
    model = MultiTaskModel(spec.model, options.trust_remote_code, options.dtype, options.device)
    for path, task, member in entries:
        model.add(model.load(path, task, member))
    return model
