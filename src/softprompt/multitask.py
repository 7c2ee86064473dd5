"""One frozen base model serving many prompted tasks at once: mixed-task batches and prompt ensembles.

The base model's weights are loaded once. Each prompt (a checkpoint) brings only its prompt and, with a head,
its own head around the shared backbone; a batch may mix rows of any tasks, each row with its own prompt.
Decoders run every row after its own prompt's kept keys/values (prompts of different lengths right-aligned in
one cache, so a row attends to its own prompt only); encoders splice each row's prompt after its [CLS]. Either
way the backbone runs once for the batch, then each task reads its rows (label words, or its head). A task with
several prompts is an ensemble: every member scores the input in the same forward, and the answer is their mean
probability (with the majority vote beside it).
"""

from __future__ import annotations

import copy
import threading
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, cast

import torch
from torch import nn
from transformers import PreTrainedModel

from .assets import Backbone, describe_model, load_backbone
from .checkpoint import checkpoint_folder, load_tensors
from .config import TaskType
from .data import Example, to_example
from .encoding import Feature, pad
from .engine import insertion_index, positions_from_mask, splice, stack_prefixes
from .errors import SoftpromptError
from .metrics import compute_metrics
from .models.base import masked_mean
from .models.decoder import DecoderPromptModel
from .models.encoder import EncoderPromptModel
from .pipeline import PromptedTask, decode_generated, read_task_checkpoint
from .precision import check_dtype
from .scoring import check_finite, first_token_scores, head_scores, label_scores

Input = str | dict[str, Any]


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


@dataclass(frozen=True)
class _Row:
    """One (prompt, encoded input) pair of a batch."""

    prompt: LoadedPrompt
    feature: Feature
    example: Example


class _Replay(nn.Module):
    """Stands in for a backbone that already ran: gives back its output, so a model's own head code reads it."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


@contextmanager
def _backbone_output(wrapper: nn.Module, output: Any) -> Iterator[None]:
    prefix = cast(str, wrapper.base_model_prefix)
    backbone = getattr(wrapper, prefix)
    setattr(wrapper, prefix, _Replay(output))
    try:
        yield
    finally:
        setattr(wrapper, prefix, backbone)


def _rows_of(output: Any, index: torch.Tensor) -> Any:
    """The given rows of every tensor of a model output."""
    return type(output)(**{k: v[index] for k, v in output.items() if torch.is_tensor(v)})


class MultiTaskModel:
    """Many prompted tasks over one frozen base model, predicted together in mixed batches.

    `predict` and `generate` run one batch at a time (call them from one thread); `load`, `add`, `remove` and
    `tasks` may be called from any thread while they run: a batch keeps the prompts it started with. Each prompt
    runs in the precision it was trained and evaluated in (`dtype=None`), so its answers equal
    `PromptedTask.from_pretrained(checkpoint).predict`'s: the frozen weights are held once per precision in use,
    and rows of each precision share their own forward. `dtype="bf16"` or `"fp32"` runs every prompt in that one.
    """

    def __init__(self, base_model: str, trust_remote_code: bool = False, dtype: str | None = None) -> None:
        check_dtype(dtype)
        self.info = describe_model(base_model, trust_remote_code)
        self.base_name = base_model
        self.trust_remote_code, self.dtype = trust_remote_code, dtype
        loaded = self._load_shared()
        # decoders and encoder-decoders: the model with its LM head, which text-to-text prompts share whole;
        # encoders: only the backbone is shared (every task has its own head)
        self._spare: nn.Module | None = loaded.model.eval()  # loaded, not yet held for a precision
        self.tokenizer = loaded.tokenizer
        self._head_dtype = next(loaded.model.parameters()).dtype
        self._backbones: dict[bool, nn.Module] = {}  # bf16 or not -> the frozen weights in that precision
        self._build_lock = threading.Lock()  # builds share the backbone: one at a time
        self._edit_lock = threading.Lock()
        self._registry: dict[str, dict[str, LoadedPrompt]] = {}  # replaced on every change, never mutated

    def _load_shared(self) -> Backbone:
        shared_type = {"decoder": TaskType.CAUSAL_LM, "encoder": TaskType.SEQ_CLS,
                       "seq2seq": TaskType.SEQ_2_SEQ_LM}[self.info.family]
        return load_backbone(self.info, shared_type)

    def _backbone(self, bf16: bool) -> nn.Module:
        """The frozen weights in one precision: the loaded copy for the first precision asked for, cast in place;
        a second precision loads them once more (memory for two copies, only where prompts of both are loaded)."""
        if bf16 not in self._backbones:
            model = self._spare if self._spare is not None else self._load_shared().model.eval()
            self._spare = None
            if bf16:
                for param in model.parameters():
                    param.data = param.data.to(torch.bfloat16)
            self._backbones[bf16] = model
        return self._backbones[bf16]

    @classmethod
    def from_pretrained(cls, checkpoints: Sequence[str | Path] | Mapping[str, str | Path | Sequence[str | Path]],
                        trust_remote_code: bool = False, dtype: str | None = None,
                        base_model: str | None = None) -> "MultiTaskModel":
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
        model = cls(base_model or first.model, trust_remote_code, dtype)
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
        bf16 = spec.bf16 if self.dtype is None else self.dtype == "bf16"
        spec = replace(spec, trust_remote_code=self.trust_remote_code, bf16=bf16)
        tensors = load_tensors(directory, meta)
        with self._build_lock:
            prompted = PromptedTask.build(spec, self.info, initialise=False, backbone=self._backbone_for(spec))
        prompted.model.load_tensors(tensors)
        prompted.model.eval()
        return LoadedPrompt(task or spec.task.name, member or str(checkpoint), prompted, str(directory))

    def _backbone_for(self, spec) -> Backbone:
        """The shared model itself for text-to-text prompts; for a head, a model of the task's head class whose
        backbone is the shared one (only the head is new: built empty, then filled from the checkpoint)."""
        shared = self._backbone(spec.bf16)
        if spec.task_type is not TaskType.SEQ_CLS:
            return Backbone(shared, self.tokenizer, self.base_name)
        from transformers import AutoModelForSequenceClassification

        config = copy.deepcopy(self.info.config)
        config.num_labels = 1 if spec.task.is_regression else len(spec.task.labels)
        config.problem_type = "regression" if spec.task.is_regression else "single_label_classification"
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = self.tokenizer.pad_token_id
        with torch.device("meta"):
            wrapper = AutoModelForSequenceClassification.from_config(
                config, trust_remote_code=self.trust_remote_code, dtype=self._head_dtype)
        prefix = wrapper.base_model_prefix
        setattr(wrapper, prefix, shared.base_model)
        device = next(shared.parameters()).device
        for name, child in wrapper.named_children():
            if name != prefix:
                child.to_empty(device=device)
        return Backbone(wrapper.eval(), self.tokenizer, self.base_name)

    def add(self, prompt: LoadedPrompt) -> None:
        """Serve `prompt` (replacing a member of the same name); members of one task must share its labels."""
        with self._edit_lock:
            members = dict(self._registry.get(prompt.task, {}))
            others = [p for name, p in members.items() if name != prompt.member]
            if others and _signature(others[0]) != _signature(prompt):
                raise SoftpromptError(f"task {prompt.task!r} holds prompts with labels {list(others[0].prompted.task.labels)} "
                                      f"and fields {list(others[0].prompted.task.fields)}; {prompt.source} has "
                                      f"{list(prompt.prompted.task.labels)} and {list(prompt.prompted.task.fields)}: "
                                      "give it another task name")
            members[prompt.member] = prompt
            self._registry = {**self._registry, prompt.task: members}

    def remove(self, task: str, member: str | None = None) -> None:
        """Stop serving a task, or one member of it."""
        with self._edit_lock:
            if task not in self._registry or (member is not None and member not in self._registry[task]):
                raise UnknownTask(f"no task {task!r}" + (f" with member {member!r}" if member else ""))
            registry = dict(self._registry)
            if member is None or len(registry[task]) == 1:
                del registry[task]
            else:
                registry[task] = {name: p for name, p in registry[task].items() if name != member}
            self._registry = registry

    def prompts(self, task: str) -> list[LoadedPrompt]:
        """The members of `task`."""
        if task not in self._registry:
            raise UnknownTask(f"no task {task!r}")
        return list(self._registry[task].values())

    def tasks(self) -> dict[str, TaskInfo]:
        registry = self._registry
        return {name: _info(name, members) for name, members in registry.items()}

    # -- prediction ----------------------------------------------------------------------------------------
    def _rows(self, items: Sequence[tuple[str, Input | Example]],
              registry: dict[str, dict[str, LoadedPrompt]]) -> list[list[_Row]]:
        """Each item's rows: one per member of its task, encoded with that member's own template."""
        out = []
        for i, (task, given) in enumerate(items):
            if task not in registry:
                raise UnknownTask(f"no task {task!r}; this model serves {', '.join(sorted(registry)) or 'none'}")
            members = list(registry[task].values())
            try:
                example = to_example(given, members[0].prompted.task.fields)
                out.append([_Row(m, m.prompted.encoder.encode(example), example) for m in members])
            except SoftpromptError as err:
                raise SoftpromptError(f"input {i}: {err}") from None
        return out

    def check(self, items: Sequence[tuple[str, Input]]) -> None:
        """Refuse what `predict` would refuse before any forward (an unknown task, a missing field, an empty input),
        naming the item by its place in `items`: a server checks a request so, before it joins a batch."""
        self._rows(items, self._registry)

    def _item_scores(self, grouped: list[list[_Row]], batch_size: int) -> list[list[torch.Tensor]]:
        """Each item's scores, one per member, all finite (or an error naming the item)."""
        flat = iter(self._scores([row for rows in grouped for row in rows], batch_size))
        per_item = [[next(flat) for _ in rows] for rows in grouped]
        for i, scores in enumerate(per_item):
            check_finite(torch.stack(scores)[None], [f"input {i} (task {grouped[i][0].prompt.task!r})"])
        return per_item

    def predict(self, items: Sequence[tuple[str, Input]], batch_size: int = 64) -> list[dict[str, Any]]:
        """One result per (task, input): {"task", "label", "scores"} (probability per label), or {"task",
        "value"} for regression; an ensemble adds each member's and the majority "vote"."""
        grouped = self._rows(items, self._registry)
        return [_combine(rows[0].prompt.task, list(zip((row.prompt for row in rows), scores)))
                for rows, scores in zip(grouped, self._item_scores(grouped, batch_size))]

    def evaluate(self, task: str, examples: list[Example], batch_size: int = 64) -> dict[str, Any]:
        """Each member's metrics on labelled `examples` and the ensemble's (mean probability, majority vote)."""
        if not examples or any(e.label is None for e in examples):
            raise SoftpromptError("evaluation needs labelled examples")
        grouped = self._rows([(task, e) for e in examples], self._registry)
        per_item = self._item_scores(grouped, batch_size)
        members = [row.prompt for row in grouped[0]]
        spec, gold = members[0].prompted.task, [e.label for e in examples]

        def metrics(preds: list) -> dict[str, float]:
            return compute_metrics(spec.metrics, preds, gold)

        out: dict[str, Any] = {"members": {m.member: metrics([_prediction(s[i], spec.is_regression) for s in per_item])
                                           for i, m in enumerate(members)}}
        combined = [_combine(task, list(zip(members, s))) for s in per_item]
        if spec.is_regression:
            out["mean"] = metrics([c["value"] for c in combined])
        else:
            index = {label: i for i, label in enumerate(spec.labels)}
            out["mean_probability"] = metrics([index[c["label"]] for c in combined])
            out["majority_vote"] = metrics([index[c.get("vote", c["label"])] for c in combined])
        return out

    def _scores(self, rows: list[_Row], batch_size: int) -> list[torch.Tensor]:
        """Each row's scores (label log-likelihoods or head log-probabilities; a value for regression)."""
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].feature))  # similar lengths pad less
        out: list[torch.Tensor] = [None] * len(rows)  # type: ignore[list-item]
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                for i, s in zip(chunk, self._forward([rows[i] for i in chunk])):
                    out[i] = s
        return out

    def _forward(self, rows: list[_Row]) -> list[torch.Tensor]:
        """Rows of each precision apart (each runs on its own copy of the frozen weights); within one, the rows that
        can go together in one mixed forward, and the rest one sub-batch per prompt: on decoders the rows of
        prompts the engine shares; on encoders the rows of input-vector prompts (a prefix is each layer's cache,
        not spliced vectors); on encoder-decoders none."""
        if self.info.family == "decoder":
            mixed = self._decoder_scores
            group = [(r.prompt.prompted.spec.bf16, self._shares(r)) for r in rows]
        elif self.info.family == "encoder":
            mixed = self._encoder_scores
            group = [(r.prompt.prompted.spec.bf16, r.prompt.prompted.spec.method != "prefix") for r in rows]
        else:
            return self._each_prompt_alone(rows)
        out: list[torch.Tensor] = [None] * len(rows)  # type: ignore[list-item]
        for key in dict.fromkeys(group):
            index = [i for i, g in enumerate(group) if g == key]
            for i, s in zip(index, (mixed if key[1] else self._each_prompt_alone)([rows[i] for i in index])):
                out[i] = s
        return out

    def _each_prompt_alone(self, rows: list[_Row]) -> list[torch.Tensor]:
        """The single-task path, one sub-batch per prompt."""
        out: list[torch.Tensor] = [None] * len(rows)  # type: ignore[list-item]
        for index in _by_prompt(rows).values():
            prompted = rows[index[0]].prompt.prompted
            for i, s in zip(index, label_scores(prompted.model, prompted.encoder, [rows[i].feature for i in index])):
                out[i] = s
        return out

    # -- decoders: every row after its own prompt's keys/values ----------------------------------------------
    @staticmethod
    def _shares(row: _Row) -> bool:
        prompted = row.prompt.prompted
        longest_label = max(map(len, prompted.encoder.label_ids), default=0)
        return _decoder(row.prompt).shares(len(row.feature.input_ids) + longest_label)

    def _decoder_run(self, rows: list[_Row]):
        """Run the rows (all of prompts that share) after their prompts in one forward: their final states and
        the cache of prompts + rows (keys/values, mask, each row's last position)."""
        groups = _by_prompt(rows)
        owner = torch.empty(len(rows), dtype=torch.long)
        prefixes = []
        for g, index in enumerate(groups.values()):
            owner[index] = g
            prefixes.append(_decoder(rows[index[0]].prompt).engine.prefix_states()[0])
        layers, prefix_mask = stack_prefixes(prefixes, owner)
        ids, mask = pad([r.feature.input_ids for r in rows], self.tokenizer.pad_token_id, side="left")
        full_mask = torch.cat([prefix_mask, mask], dim=1)
        positions = positions_from_mask(full_mask)[:, prefix_mask.shape[1]:]
        hidden, layers = _decoder(rows[0].prompt).engine.run_cached(layers, ids, full_mask, positions)
        return hidden, (layers, full_mask, positions[:, -1:]), groups

    def _decoder_scores(self, rows: list[_Row]) -> list[torch.Tensor]:
        """Rows of prompts the engine shares, in one forward; then each task reads its rows."""
        out: list[torch.Tensor] = [None] * len(rows)  # type: ignore[list-item]
        hidden, (layers, mask, last_position), groups = self._decoder_run(rows)
        for index in groups.values():
            prompted, model = rows[index[0]].prompt.prompted, _decoder(rows[index[0]].prompt)
            at = torch.tensor(index)
            last = hidden[at, -1]
            if model.head is not None:  # the rows' own columns of the mask over prompts + rows mark their text
                features = model.pooled(hidden[at], mask[at, -hidden.shape[1]:])
                scores = head_scores(model.head(features), prompted.task.is_regression)
            elif all(len(ids) == 1 for ids in prompted.encoder.label_ids):
                scores = first_token_scores(model.engine.lm_logits(last), prompted.encoder.label_ids)
            else:
                cache = ([(keys[at], values[at]) for keys, values in layers], mask[at], last_position[at])
                scores = model.engine.logprobs_after(last[:, None], cache, prompted.encoder.label_ids)
            for j, s in zip(index, scores):
                out[j] = s
        return out

    def generate(self, items: Sequence[tuple[str, Input]], max_new_tokens: int = 20) -> list[str]:
        """Greedy free text after each item's prompt + template, in one batch (an ensemble generates with its
        first member)."""
        rows = [group[0] for group in self._rows(items, self._registry)]
        for row in rows:
            if row.prompt.prompted.spec.task_type is not TaskType.CAUSAL_LM:
                raise SoftpromptError(f"task {row.prompt.task!r} cannot generate: it needs a decoder prompt trained "
                                      "with label words (CAUSAL_LM)")
        out: list[str] = [""] * len(rows)
        with torch.inference_mode():
            for bf16 in dict.fromkeys(r.prompt.prompted.spec.bf16 for r in rows):  # each precision on its weights
                index = [i for i, r in enumerate(rows) if r.prompt.prompted.spec.bf16 == bf16]
                group = [rows[i] for i in index]
                if all(_decoder(r.prompt).shares(len(r.feature.input_ids) + max_new_tokens) for r in group):
                    hidden, cache, _ = self._decoder_run(group)
                    new = _decoder(group[0].prompt).engine.greedy_after(hidden[:, -1], cache, max_new_tokens)
                    texts = [decode_generated(self.tokenizer, row) for row in new.tolist()]
                else:
                    texts = [row.prompt.prompted.generate([row.example], max_new_tokens)[0] for row in group]
                for i, text in zip(index, texts):
                    out[i] = text
        return out

    # -- encoders: each row's prompt spliced after its [CLS] -------------------------------------------------
    def _encoder_scores(self, rows: list[_Row]) -> list[torch.Tensor]:
        # a siamese prompt reads each text of a pair alone: its row's second text is one more sequence
        sequences = [(i, r.feature.input_ids, r.feature.token_type_ids) for i, r in enumerate(rows)]
        second = {}
        for i, r in enumerate(rows):
            if r.feature.pair_ids is not None:
                second[i] = len(sequences)
                sequences.append((i, r.feature.pair_ids, None))
        owner = torch.tensor([i for i, _, _ in sequences])
        ids, mask = pad([s[1] for s in sequences], self.tokenizer.pad_token_id)
        types = None
        if any(s[2] is not None for s in sequences):
            types, _ = pad([s[2] or [0] * len(s[1]) for s in sequences], 0)
        models = [_encoder(rows[i].prompt) for i in owner.tolist()]
        lengths = torch.tensor([m.prompt.num_tokens for m in models])
        index = insertion_index(torch.ones(len(sequences), dtype=torch.long), ids.shape[1], lengths)
        prompts = nn.utils.rnn.pad_sequence([m.prompt.embeddings() for m in models], batch_first=True)
        backbone = cast(PreTrainedModel, models[0].base.base_model)  # the frozen weights of these rows' precision
        embeds = backbone.get_input_embeddings()(ids)
        columns = torch.arange(index.shape[1]).unsqueeze(0)
        full_mask = (columns < (mask.sum(1) + lengths).unsqueeze(1)).long()
        inputs = {"inputs_embeds": splice(embeds, prompts.to(embeds.dtype), index), "attention_mask": full_mask}
        if types is not None:
            inputs["token_type_ids"] = splice(types, types.new_zeros(len(sequences), prompts.shape[1]), index) * full_mask
        output = backbone(**inputs)
        text = full_mask * ((columns < 1) | (columns >= 1 + lengths.unsqueeze(1)))  # the prompt follows [CLS]
        out: list[torch.Tensor] = [None] * len(rows)  # type: ignore[list-item]
        for index_rows in _by_prompt(rows).values():
            model = _encoder(rows[index_rows[0]].prompt)
            first = torch.tensor(index_rows)  # a row's first sequence sits at its own index
            if model.config.pooling == "cls":  # the model's own pooling and head, over the rows' outputs
                with _backbone_output(model.base, _rows_of(output, first)):
                    logits = model.base().logits
            else:
                features = masked_mean(output.last_hidden_state[first], text[first])
                if model.config.pooling == "siamese":
                    at = torch.tensor([second[i] for i in index_rows])
                    pair = masked_mean(output.last_hidden_state[at], text[at])
                    u, v = (nn.functional.normalize(x, dim=-1) for x in (features, pair))
                    features = model.pair_features(u, v)
                logits = model.head_logits(features)
            for i, s in zip(index_rows, head_scores(logits, rows[index_rows[0]].prompt.prompted.task.is_regression)):
                out[i] = s
        return out


def _decoder(prompt: LoadedPrompt) -> DecoderPromptModel:
    """A prompt's model on a decoder base (the decoder paths see no other)."""
    return cast(DecoderPromptModel, prompt.prompted.model)


def _encoder(prompt: LoadedPrompt) -> EncoderPromptModel:
    """A prompt's model on an encoder base (the encoder path sees no other)."""
    return cast(EncoderPromptModel, prompt.prompted.model)


def _checkpoint_or_run(path: Path) -> Path:
    """A run folder stands for its best checkpoint; any other folder for itself (its reader says what is wrong)."""
    return checkpoint_folder(path) or path


def _by_prompt(rows: list[_Row]) -> dict[int, list[int]]:
    """Row indices per prompt, in order of first appearance."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[id(row.prompt)].append(i)
    return groups


def _signature(prompt: LoadedPrompt) -> tuple:
    task = prompt.prompted.task
    return task.labels, task.fields, task.is_regression


def _info(name: str, members: dict[str, LoadedPrompt]) -> TaskInfo:
    first = next(iter(members.values()))
    task = first.prompted.task
    return TaskInfo(name, () if task.is_regression else tuple(task.labels), task.is_regression, tuple(task.fields),
                    tuple(members), all(m.prompted.spec.task_type is TaskType.CAUSAL_LM for m in members.values()),
                    tuple("bf16" if m.prompted.spec.bf16 else "fp32" for m in members.values()))


def _prediction(scores: torch.Tensor, regression: bool) -> float | int:
    return float(scores) if regression else int(scores.argmax())


def majority_vote(probs: torch.Tensor) -> int:
    """The class most members pick (probs: members x classes); a tie goes to the higher mean probability."""
    votes = torch.bincount(probs.argmax(-1), minlength=probs.shape[-1])
    tied = votes == votes.max()
    return int(torch.where(tied, probs.mean(0), torch.tensor(-1.0, dtype=probs.dtype)).argmax())


def _combine(task: str, members: list[tuple[LoadedPrompt, torch.Tensor]]) -> dict[str, Any]:
    """One item's answer from its members' scores: their mean (probability, or value for regression)."""
    spec = members[0][0].prompted.task
    if spec.is_regression:
        out: dict[str, Any] = {"task": task, "value": sum(float(s) for _, s in members) / len(members)}
        if len(members) > 1:
            out["members"] = [{"member": p.member, "value": float(s)} for p, s in members]
        return out
    probs = torch.stack([torch.softmax(s.float(), -1) for _, s in members])

    def labelled(p: torch.Tensor) -> dict[str, Any]:
        return {"label": spec.labels[int(p.argmax())],
                "scores": {name: round(float(x), 6) for name, x in zip(spec.labels, p)}}

    out = {"task": task, **labelled(probs.mean(0))}
    if len(members) > 1:
        out["members"] = [{"member": p.member, **labelled(probs[i])} for i, (p, _) in enumerate(members)]
        out["vote"] = spec.labels[majority_vote(probs)]
    return out
