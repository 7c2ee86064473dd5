"""`MultiTaskModel`: one frozen base model serving many prompted tasks, predicted together in mixed batches.

The base model's weights are loaded once (once per precision in use). Each prompt (a checkpoint) brings only its
prompt and, with a head, its own head around the shared backbone; a batch may mix rows of any tasks, each row
with its own prompt (forward.py). A task with several prompts is an ensemble: every member scores the input in
the same forward, and the answer is their mean probability, with the majority vote beside it (ensemble.py).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence, cast

import torch
from transformers import GenerationMixin, PreTrainedModel, StoppingCriteriaList

from ..assets import describe_model
from ..checkpoint import checkpoint_folder, load_tensors
from ..data import Example, to_example
from ..encoding import BLANK, is_blank
from ..errors import SoftpromptError
from ..metrics import compute_metrics
from ..pipeline import PromptedTask, read_task_checkpoint
from ..devices import resolve_device
from ..precision import check_dtype
from ..scoring import by_length, check_finite
from .backbones import Backbones
from .ensemble import combine, prediction
from .forward import Row, can_generate, forward, generate
from .generation import Generated, Progress, Reporting, Sampling, Wants, seeded
from .registry import BaseMismatch, LoadedPrompt, Registry, Snapshot, TaskInfo, UnknownTask

Input = str | dict[str, Any]
Chat = list[dict[str, str]]  # messages ({role, content}) for the base model, read through its chat template
Item = tuple[str | None, Input | Chat]  # (task, input); task None: the base model, on a text or a chat


class MultiTaskModel:
    """Many prompted tasks over one frozen base model, predicted together in mixed batches.

    `predict` and `generate` run one batch at a time (call them from one thread); `load`, `add`, `remove` and
    `tasks` may be called from any thread while they run: a batch keeps the prompts it started with. Each prompt
    runs in the precision it was trained and evaluated in (`dtype=None`), so its answers equal
    `PromptedTask.from_pretrained(checkpoint).predict`'s; `dtype="bf16"` or `"fp32"` runs every prompt in that one.
    """

    def __init__(self, base_model: str, trust_remote_code: bool = False, dtype: str | None = None,
                 device: str | None = "auto") -> None:
        self.dtype = check_dtype(dtype)
        self.device = resolve_device(device)
        self.info = describe_model(base_model, trust_remote_code)
        self.base_name, self.trust_remote_code = base_model, trust_remote_code
        self.backbones = Backbones(self.info, trust_remote_code, self.device)
        self.tokenizer = self.backbones.tokenizer
        self.registry = Registry()

    @classmethod
    def from_pretrained(cls, checkpoints: Sequence[str | Path] | Mapping[str, str | Path | Sequence[str | Path]],
                        trust_remote_code: bool = False, dtype: str | None = None,
                        base_model: str | None = None, device: str | None = "auto") -> "MultiTaskModel":
        """Checkpoints of one base model: a list (each named by its task; several of one task make an ensemble)
        or {task: checkpoint or [checkpoints]}. The base model (unless `base_model` points at another copy of it)
        comes from the first checkpoint; each prompt runs in its own checkpoint's precision unless `dtype` says
        bf16 or fp32 for all."""
        entries: list[tuple[str | Path, str | None]]
        if isinstance(checkpoints, Mapping):
            entries = [(path, task) for task, paths in checkpoints.items()
                       for path in ([paths] if isinstance(paths, (str, Path)) else paths)]
        else:
            entries = [(path, None) for path in checkpoints]
        if not entries:
            raise SoftpromptError("no checkpoints given")
        _, _, first = read_task_checkpoint(_checkpoint_or_run(Path(entries[0][0])), trust_remote_code)
        model = cls(base_model or first.model, trust_remote_code, dtype, device)
        for path, task in entries:
            model.add(model.load(path, task))
        return model

    # -- the prompts it holds ------------------------------------------------------------------------------
    def load(self, checkpoint: str | Path, task: str | None = None, member: str | None = None) -> LoadedPrompt:
        """Read a checkpoint (a folder, a run folder, or a hub repo id) and build it around the shared backbone;
        nothing is served until `add`. Refuses a prompt trained on another base model (BaseMismatch)."""
        path = Path(checkpoint).expanduser()
        directory, meta, spec = read_task_checkpoint(_checkpoint_or_run(path) if path.exists() else checkpoint,
                                                     self.trust_remote_code)
        try:
            meta.check_base(self.info.config, self.base_name)
        except SoftpromptError as err:
            raise BaseMismatch(str(err)) from None
        spec = replace(spec, trust_remote_code=self.trust_remote_code, device=str(self.device))
        if self.dtype is not None:
            spec = replace(spec, bf16=self.dtype == "bf16", fp16=False)
        tensors = load_tensors(directory, meta)
        prompted = self.backbones.build(spec, lambda backbone: PromptedTask.build(spec, self.info, initialise=False,
                                                                                  backbone=backbone))
        prompted.model.load_tensors(tensors)
        prompted.model.eval()
        return LoadedPrompt(task or spec.task.name, member or str(checkpoint), prompted, str(directory))

    def add(self, prompt: LoadedPrompt) -> None:
        """Serve `prompt` (replacing a member of the same name); members of one task must share its labels."""
        self.registry.add(prompt)

    def remove(self, task: str, member: str | None = None) -> None:
        """Stop serving a task, or one member of it."""
        self.registry.remove(task, member)

    def prompts(self, task: str) -> list[LoadedPrompt]:
        """The members of `task`."""
        return self.registry.members(task)

    def tasks(self) -> dict[str, TaskInfo]:
        return self.registry.tasks()

    # -- prediction ----------------------------------------------------------------------------------------
    def _rows(self, items: Sequence[tuple[str, Input | Example]], snapshot: Snapshot,
              first: int = 0) -> list[list[Row]]:
        """Each item's rows: one per member of its task, encoded with that member's own template; a refused
        item is named by its place in `items` (counted from `first`)."""
        out = []
        for i, (task, given) in enumerate(items, first):
            if task not in snapshot:
                raise UnknownTask(f"no task {task!r}; this model serves {', '.join(sorted(snapshot)) or 'none'}")
            members = list(snapshot[task].values())
            try:
                example = to_example(given, members[0].prompted.task.fields)
                out.append([Row(m, m.prompted.encoder.encode(example), example) for m in members])
            except SoftpromptError as err:
                raise SoftpromptError(f"input {i}: {err}") from None
        return out

    def check(self, items: Sequence[Item], max_new_tokens: int | None = None) -> list[int]:
        """Refuse what `predict` (or, given `max_new_tokens`, `complete`) would refuse before any forward (an unknown
        task, a missing field, an empty input, more tokens than the model has positions), naming the item by its
        place in `items`: a server checks a request so, before it joins a batch. Returns each item's tokens as the
        model reads them (template included, the prompt's virtual tokens not; an ensemble's first member's)."""
        snapshot, counts = self.registry.snapshot, []
        for i, (task, given) in enumerate(items):
            if task is None:
                prompt, ids = 0, self._plain_ids(given, i)
            else:
                row = self._rows([(task, cast(Input, given))], snapshot, i)[0][0]
                prompt, ids = row.prompt.prompted.model.prompt.num_tokens, row.feature.input_ids
            positions = self.info.max_positions
            if max_new_tokens is not None and positions and prompt + len(ids) + max_new_tokens > positions:
                raise SoftpromptError(f"input {i}: its {len(ids)} tokens, {prompt} virtual tokens and {max_new_tokens} "
                                      f"new ones are more than the model's {positions} positions; ask for fewer")
            counts.append(len(ids))
        return counts

    def _plain_ids(self, given: Input | Chat, index: int) -> list[int]:
        """The base model's token ids for a text (with the special tokens its tokenizer adds) or a chat (through the
        tokenizer's chat template, which places them itself)."""
        if self.info.family != "decoder":
            raise SoftpromptError(f"the base model {self.base_name} is an {self.info.family}: it cannot generate text")
        if isinstance(given, dict):
            raise SoftpromptError(f"input {index}: the base model takes a text, not fields")
        texts = [given] if isinstance(given, str) else [m.get("content", "") for m in given]
        if is_blank(texts):
            raise SoftpromptError(f"input {index}: {BLANK}")
        if not any(self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts):
            raise SoftpromptError(f"input {index}: no token this model reads in the input (only characters its "
                                  "tokenizer drops); give it some text")
        if isinstance(given, str):
            return self.tokenizer(given)["input_ids"]
        try:
            chat = self.tokenizer.apply_chat_template(given, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # noqa: BLE001 -- the template's own refusal (jinja2's TemplateError, or its raise)
            raise SoftpromptError(f"input {index}: the tokenizer's chat template refuses these messages ({err})") \
                from None
        return self.tokenizer(chat, add_special_tokens=False)["input_ids"]

    def _item_scores(self, grouped: list[list[Row]], batch_size: int) -> list[list[torch.Tensor]]:
        """Each item's scores, one per member, all finite (or an error naming the item)."""
        rows = [row for item in grouped for row in item]
        flat: list[torch.Tensor] = [None] * len(rows)  # type: ignore[list-item]
        with torch.inference_mode():
            for batch in by_length([len(r.feature) for r in rows], batch_size):
                for i, s in zip(batch, forward([rows[i] for i in batch], self.info.family,
                                               self.tokenizer.pad_token_id)):
                    flat[i] = s
        scores = iter(flat)
        per_item = [[next(scores) for _ in item] for item in grouped]
        for i, item in enumerate(per_item):
            check_finite(torch.stack(item)[None], [f"input {i} (task {grouped[i][0].prompt.task!r})"])
        return per_item

    def predict(self, items: Sequence[tuple[str, Input]], batch_size: int = 64) -> list[dict[str, Any]]:
        """One result per (task, input): {"task", "label", "scores"} (probability per label), or {"task",
        "value"} for regression; an ensemble adds each member's and the majority "vote"."""
        grouped = self._rows(items, self.registry.snapshot)
        return [combine(rows[0].prompt.task, list(zip((row.prompt for row in rows), scores)))
                for rows, scores in zip(grouped, self._item_scores(grouped, batch_size))]

    def evaluate(self, task: str, examples: list[Example], batch_size: int = 64) -> dict[str, Any]:
        """Each member's metrics on labelled `examples` and the ensemble's (mean probability, majority vote)."""
        if not examples or any(e.label is None for e in examples):
            raise SoftpromptError("evaluation needs labelled examples")
        grouped = self._rows([(task, e) for e in examples], self.registry.snapshot)
        per_item = self._item_scores(grouped, batch_size)
        members = [row.prompt for row in grouped[0]]
        spec, gold = members[0].prompted.task, [e.label for e in examples]

        def metrics(preds: list) -> dict[str, float]:
            return compute_metrics(spec.metrics, preds, gold)

        out: dict[str, Any] = {"members": {m.member: metrics([prediction(s[i], spec.is_regression) for s in per_item])
                                           for i, m in enumerate(members)}}
        combined = [combine(task, list(zip(members, s))) for s in per_item]
        if spec.is_regression:
            out["mean"] = metrics([c["value"] for c in combined])
        else:
            index = {label: i for i, label in enumerate(spec.labels)}
            out["mean_probability"] = metrics([index[c["label"]] for c in combined])
            out["majority_vote"] = metrics([index[c.get("vote", c["label"])] for c in combined])
        return out

    def generate(self, items: Sequence[tuple[str, Input]], max_new_tokens: int = 20) -> list[str]:
        """Greedy free text after each item's prompt + template, in one batch (`complete` at temperature 0)."""
        return [out.text for out in self.complete(items, Sampling(max_new_tokens))]

    def complete(self, items: Sequence[Item], sampling: Sampling = Sampling(),
                 wants: Sequence[Wants] | None = None) -> list[Generated]:
        """Free text after each item's prompt + template (an ensemble generates with its first member), or, task
        None, the base model's after a text or a chat, with no prompt; every row with the same `sampling`, each with
        its own `wants` (seed, stop strings, text as it comes, cancellation). Rows of tasks go through the shared
        prefix in one batch where it shares their prompts; the others, and the base model's, one by one through
        transformers' `generate`."""
        wants = list(wants) if wants is not None else [Wants()] * len(items)
        progress = [Progress(self.tokenizer, w, sampling.max_new_tokens) for w in wants]
        tasked = [i for i, (task, _) in enumerate(items) if task is not None]
        rows = [group[0] for group in self._rows([cast(tuple[str, Input], items[i]) for i in tasked],
                                                 self.registry.snapshot)]
        for row in rows:
            if not can_generate(row):
                raise SoftpromptError(f"task {row.prompt.task!r} cannot generate: it needs a decoder prompt trained "
                                      "with label words (CAUSAL_LM)")
        plain = [(i, self._plain_ids(given, i)) for i, (task, given) in enumerate(items) if task is None]
        with torch.inference_mode():
            if rows:
                generate(rows, sampling, [progress[i] for i in tasked], self.tokenizer.pad_token_id)
            for i, ids in plain:
                self._plain_generate(ids, sampling, progress[i])
        return [p.result() for p in progress]

    def _plain_generate(self, ids: list[int], sampling: Sampling, progress: Progress) -> None:
        """The base model alone after `ids`, through its own `generate`, in the precision `dtype` says (else one
        already held, fp32 first)."""
        held = self.backbones.held
        precision = self.dtype or ("fp32" if "fp32" in held or not held else next(iter(held)))
        model = cast(PreTrainedModel, self.backbones.weights(precision))
        tensor = torch.tensor([ids], device=model.device)
        with seeded(progress.wants.seed, model.device):
            cast(GenerationMixin, model).generate(
                input_ids=tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=sampling.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                stopping_criteria=StoppingCriteriaList([Reporting([progress])]), **sampling.generate_kwargs())


def _checkpoint_or_run(path: Path) -> Path:
    """A run folder stands for its best checkpoint; any other folder for itself (its reader says what is wrong)."""
    return checkpoint_folder(path) or path
