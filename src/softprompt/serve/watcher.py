"""A prompt folder the server follows: checkpoints appearing, changing or vanishing there are added or removed.

Layout: `DIR/<task>/` is one checkpoint (or a run folder, whose best/ is used), and `DIR/<task>/<member>/`
several checkpoints, an ensemble for that task. Checkpoints are written atomically (a new folder renamed into
place), so a changed softprompt.json file (its inode, size or mtime) means a new checkpoint.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

from ..checkpoint import META_FILE, checkpoint_folder
from ..errors import SoftpromptError
from ..multitask import MultiTaskModel, UnknownTask

log = logging.getLogger(__name__)

Key = tuple[str, "str | None"]  # (task, member); member None: the task is one checkpoint


def prompt_folder(directory: str | Path) -> Path:
    if not Path(directory).is_dir():
        raise SoftpromptError(f"prompt folder {directory} does not exist (or is not a folder)")
    return Path(directory)


def scan(directory: str | Path) -> dict[Key, Path]:
    """Every checkpoint of a prompt folder, keyed by (task, member)."""
    found: dict[Key, Path] = {}
    for sub in sorted(prompt_folder(directory).iterdir()):
        if not sub.is_dir() or sub.name.startswith("."):
            continue
        single = checkpoint_folder(sub)
        if single:
            found[(sub.name, None)] = single
            continue
        for member in sorted(sub.iterdir()):
            checkpoint = checkpoint_folder(member) if member.is_dir() and not member.name.startswith(".") else None
            if checkpoint:
                found[(sub.name, member.name)] = checkpoint
    return found


def _signature(checkpoint: Path) -> tuple[int, int, int]:
    stat = (checkpoint / META_FILE).stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class PromptWatcher:
    """Polls `directory` every `interval` seconds on its own thread; loading happens on that thread, so requests
    in flight never wait for it, and each prompt enters the model in one atomic `add`. `loaded(ok)` hears of each
    load tried (the server's metrics)."""

    def __init__(self, model: MultiTaskModel, directory: str | Path, interval: float = 1.0,
                 loaded: Callable[[bool], None] | None = None) -> None:
        self.model, self.directory, self.interval, self.loaded = model, prompt_folder(directory), interval, loaded
        self.seen: dict[Key, tuple[int, int, int]] = {}  # what was last loaded (or failed to load) from each
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="softprompt-watch", daemon=True)

    def poll(self) -> None:
        """One pass: remove what vanished, then load what is new or changed."""
        try:
            current = {key: (path, _signature(path)) for key, path in scan(self.directory).items()}
        except (OSError, SoftpromptError) as err:  # a folder renamed or removed mid-scan: the next pass sees it
            log.warning("watch %s: %s", self.directory, err)
            return
        for key in [k for k in self.seen if k not in current]:
            del self.seen[key]
            try:
                self.model.remove(*key)
            except UnknownTask:
                pass  # it never loaded, or went through the API
        for key, (path, signature) in current.items():
            if self.seen.get(key) == signature:
                continue
            self.seen[key] = signature
            ok = True
            try:
                self.model.add(self.model.load(path, task=key[0], member=key[1]))
                log.info("watch: loaded %s as %s", path, "/".join(k for k in key if k))
            except SoftpromptError as err:
                ok = False
                log.warning("watch: cannot load %s: %s", path, err)
            if self.loaded:
                self.loaded(ok)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()
