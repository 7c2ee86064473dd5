"""One frozen base model serving many prompted tasks at once: mixed-task batches and prompt ensembles."""

from .ensemble import majority_vote
from .generation import Generated, Sampling, Wants
from .model import Item, MultiTaskModel
from .registry import BaseMismatch, LoadedPrompt, TaskInfo, UnknownTask

__all__ = ["MultiTaskModel", "TaskInfo", "LoadedPrompt", "UnknownTask", "BaseMismatch", "majority_vote", "Sampling",
           "Wants", "Generated", "Item"]
