"""The prompts a multi-task model serves: tasks, their members (several make an ensemble), swapped atomically."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ..config import TaskType
from ..errors import SoftpromptError
from ..pipeline import PromptedTask


class UnknownTask(SoftpromptError):
    """A task (or member) name this model does not hold."""


class BaseMismatch(SoftpromptError):
    """A prompt trained on another base model than the one this model holds."""


@dataclass(frozen=True)
class TaskInfo:
    name: str
    labels: tuple[str, ...]  # () for regression
    regression: bool
    fields: tuple[str, ...]  # the input fields; a one-field task takes plain strings
    members: tuple[str, ...]  # one per prompt; more than one: an ensemble
    can_generate: bool
    precision: tuple[str, ...]  # each member's: bf16 or fp32, as it runs (and was trained, unless dtype said)


@dataclass(frozen=True)
class LoadedPrompt:
    """A checkpoint built around the shared backbone, ready to `add`."""

    task: str
    member: str
    prompted: PromptedTask
    source: str  # where it was loaded from


Snapshot = dict[str, dict[str, LoadedPrompt]]  # task -> member -> prompt


class Registry:
    """Tasks and their members. Every change builds a new snapshot under a lock and swaps it in whole, so a batch
    that took one keeps its prompts, and readers need no lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.snapshot: Snapshot = {}

    def add(self, prompt: LoadedPrompt) -> None:
        """Serve `prompt` (replacing a member of the same name); members of one task must share its labels."""
        with self._lock:
            members = dict(self.snapshot.get(prompt.task, {}))
            others = [p for name, p in members.items() if name != prompt.member]
            if others and _signature(others[0]) != _signature(prompt):
                first = others[0].prompted.task
                raise SoftpromptError(f"task {prompt.task!r} holds prompts with labels {list(first.labels)} and fields "
                                      f"{list(first.fields)}; {prompt.source} has {list(prompt.prompted.task.labels)} "
                                      f"and {list(prompt.prompted.task.fields)}: give it another task name")
            members[prompt.member] = prompt
            self.snapshot = {**self.snapshot, prompt.task: members}

    def remove(self, task: str, member: str | None = None) -> None:
        """Stop serving a task, or one member of it."""
        with self._lock:
            if task not in self.snapshot or (member is not None and member not in self.snapshot[task]):
                raise UnknownTask(f"no task {task!r}" + (f" with member {member!r}" if member else ""))
            snapshot = dict(self.snapshot)
            if member is None or len(snapshot[task]) == 1:
                del snapshot[task]
            else:
                snapshot[task] = {name: p for name, p in snapshot[task].items() if name != member}
            self.snapshot = snapshot

    def members(self, task: str) -> list[LoadedPrompt]:
        if task not in self.snapshot:
            raise UnknownTask(f"no task {task!r}")
        return list(self.snapshot[task].values())

    def tasks(self) -> dict[str, TaskInfo]:
        return {name: _info(name, members) for name, members in self.snapshot.items()}


def _signature(prompt: LoadedPrompt) -> tuple:
    task = prompt.prompted.task
    return task.labels, task.fields, task.is_regression


def _info(name: str, members: dict[str, LoadedPrompt]) -> TaskInfo:
    task = next(iter(members.values())).prompted.task
    return TaskInfo(name, () if task.is_regression else tuple(task.labels), task.is_regression, tuple(task.fields),
                    tuple(members), all(m.prompted.spec.task_type is TaskType.CAUSAL_LM for m in members.values()),
                    tuple(m.prompted.spec.precision for m in members.values()))
