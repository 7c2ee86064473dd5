"""What every family shares: a frozen backbone, a soft prompt spliced into the input embeddings, a head.

Each batch is first re-aligned so that all padding sits on one side (the family's `pad_side`); the
prompt is then inserted at a per-row offset. Pads therefore never sit between the prompt and the text,
and a batch gives the same result whether the caller padded it left or right.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, cast

import torch
from torch import nn
from transformers import PreTrainedModel

from ..checkpoint import Checkpoint, fingerprint, load_tensors, read_checkpoint, save_checkpoint
from ..config import PromptTuningConfig, TaskType
from ..engine import insertion_index, splice
from ..errors import SoftpromptError
from ..hub import local_folder, push_saved
from ..methods import Method, get_method, held_by
from ..methods.prompt.init import initial_prompt
from ..methods.prompt.model import SoftPrompt
from ..peft_interop import read_peft
from ..tensor_names import HEAD_NAMES, HEAD_PREFIX, is_peft_adapter
from .registry import get_prompt_model


def align_order(mask: torch.Tensor, side: str) -> torch.Tensor:
    """Per-row permutation that moves padding to `side`, keeping the order of the real tokens."""
    key = mask.long() if side == "left" else (mask == 0).long()
    return torch.argsort(key, dim=1, stable=True)


def masked_mean(hidden: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(B, h): each row's mean final state over the columns `text` marks (its text: no virtual tokens, no pads),
    summed in fp32 (bf16 would round away a long text's late tokens)."""
    total = (hidden.float() * text.unsqueeze(-1).float()).sum(1) / text.sum(1, keepdim=True).float()
    return total.to(hidden.dtype)


def _inputs_in_own_dtype(module: nn.Module, args: tuple) -> tuple:
    """A head kept in fp32 over bf16 frozen weights (freeze_in) reads its features in fp32."""
    dtype = next(module.parameters()).dtype
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


class PromptModel(nn.Module):
    """A Hugging Face model with a trainable soft prompt; everything of the base model stays frozen."""

    pad_side = "right"
    family = ""

    def __init__(self, base: PreTrainedModel, config: PromptTuningConfig, tokenizer=None) -> None:
        super().__init__()
        self.base = base
        self.config = config
        self.tokenizer = tokenizer
        base.requires_grad_(False)
        self.prompt = self.new_prompt().to(self.device)  # where the frozen model is (get_prompt_model keeps it)
        self.head_name = self._find_head() if config.task_type is TaskType.SEQ_CLS else None
        if self.head is not None:
            self.head.requires_grad_(True)

    # -- construction ---------------------------------------------------------------------------------
    @property
    def method(self) -> Method:
        """The prompt method's registry entry (methods/): its tensor's name, what it contributes."""
        return get_method(self.config.method)

    def _find_head(self) -> str:
        for name in HEAD_NAMES:
            if isinstance(getattr(self.base, name, None), nn.Module):
                return name
        raise SoftpromptError(
            f"{type(self.base).__name__} has no classification head; load it with AutoModelForSequenceClassification"
        )

    def new_prompt(self) -> SoftPrompt:
        """The trainable prompt module: k input vectors (prefix tuning's model gives keys/values instead)."""
        return SoftPrompt(self.config.num_virtual_tokens, self.embedding_matrix().shape[1])

    @property
    def head(self) -> nn.Module | None:
        return getattr(self.base, self.head_name) if self.head_name else None

    def _new_head(self, width: int) -> None:
        """Replace the model's head by a fresh linear one over `width` features: a pooling that reads more than
        the model's own pooled state."""
        old = self.readout
        head = nn.Linear(width, old.out_features, bias=old.bias is not None)
        setattr(self.base, str(self.head_name), head.to(old.weight.device, old.weight.dtype))

    @property
    def device(self) -> torch.device:
        """Where the frozen model lives; batches are moved here."""
        return self.embedding_matrix().device

    def embedding_matrix(self) -> torch.Tensor:
        """The frozen input-embedding matrix (vocab, dim): the space the prompt lives in."""
        return cast(nn.Embedding, self.base.get_input_embeddings()).weight

    def init_prompt(self, corpus: Iterable[str] | None = None, generator: torch.Generator | None = None) -> None:
        value = initial_prompt(self.config, self.embedding_matrix(), self.tokenizer, corpus, generator)
        with torch.no_grad():
            self.prompt.weight.copy_(value.to(self.prompt.weight.dtype))

    def freeze_in(self, dtype: torch.dtype) -> None:
        """Keep the frozen weights in `dtype` (bf16: half the memory and, where the chip has bf16 matrix units,
        faster steps; docs/recipe.md, "Precision"). What trains (prompt, head) keeps fp32 weights, so optimizer
        updates are not rounded away; the head reads its input in its own dtype. Buffers (rotary frequencies) stay
        as they are."""
        trained = {id(p) for p in self.trainable_parameters()}
        for param in self.base.parameters():
            if id(param) not in trained:
                param.data = param.data.to(dtype)
        if self.head is not None:  # the head as it is now (siamese pooling replaces the model's own)
            self.head.register_forward_pre_hook(_inputs_in_own_dtype)

    @property
    def readout(self) -> nn.Linear:
        """The head's last linear layer: the head itself, or e.g. RoBERTa's out_proj after its dense + tanh."""
        assert self.head is not None, "only a SEQ_CLS model has a head"
        return [m for m in self.head.modules() if isinstance(m, nn.Linear)][-1]

    @torch.no_grad()
    def start_head_at_readout(self, inputs: torch.Tensor, labels: torch.Tensor) -> float:
        """Set the head to a ridge readout of its own inputs (what it reads under the starting prompt),
        fitted to training labels (one-hot for classes, whose logits are then scaled to the cross-entropy's
        best temperature). A random head over a decoder's large last states starts with errors far above the
        labels' spread, and the prompt is trained against that noise first (docs/recipe.md, "SmolLM2-135M with
        a head"). The ridge strength is
        picked on a held-out quarter of the rows; returns that quarter's mean squared error. With a deeper head
        (RoBERTa's), `inputs` are what its last linear layer reads, and only that layer is set."""
        head = self.readout
        x, classes = inputs.double(), head.out_features
        y = labels.double()[:, None] if classes == 1 else nn.functional.one_hot(labels, classes).double()
        shift = x.mean(0) if head.bias is not None else torch.zeros_like(x[0])  # no bias: fit through 0
        scale = (x - shift).pow(2).mean(0).sqrt().clamp(min=1e-6)
        offset = y.mean(0) if head.bias is not None else torch.zeros_like(y[0])
        z, target = (x - shift) / scale, y - offset

        def ridge(rows, strength):
            u, s, vt = torch.linalg.svd(z[rows], full_matrices=False)
            return vt.T @ ((s / (s * s + strength))[:, None] * (u.T @ target[rows]))

        cut = len(z) * 3 // 4
        fit, held = torch.arange(cut), torch.arange(cut, len(z))
        errors = {strength: (z[held] @ ridge(fit, strength) - target[held]).pow(2).mean().item()
                  for strength in [len(z) * 10.0 ** e for e in range(-4, 3)]} if cut else {len(z): float("nan")}
        weight = ridge(torch.arange(len(z)), min(errors, key=lambda s: errors[s]))
        bias = offset - (shift / scale) @ weight
        weight = weight / scale[:, None]
        if classes > 1:  # one-hot fits are ~0/1: sharpen them to the temperature with the lowest cross-entropy
            logits = x @ weight + bias
            temperature = min((1.0, 2.0, 5.0, 10.0, 20.0, 50.0),
                              key=lambda t: nn.functional.cross_entropy(logits * t, labels).item())
            weight, bias = weight * temperature, bias * temperature
        head.weight.copy_(weight.T.to(head.weight.dtype))
        if head.bias is not None:
            head.bias.copy_(bias.to(head.bias.dtype))
        return min(errors.values())

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    # -- the prompted forward ------------------------------------------------------------------------
    def _offsets(self, mask: torch.Tensor) -> torch.Tensor:
        """Column where the prompt goes in each (already aligned) row."""
        raise NotImplementedError

    def _extra_inputs(self, mask: torch.Tensor, token_type_ids: torch.Tensor | None, fill) -> dict:
        return {}

    def prompted_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """Keyword arguments for the base model, plus the alignment order and prompt offsets used."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        order = align_order(attention_mask, self.pad_side)
        ids = input_ids.gather(1, order)
        mask = attention_mask.gather(1, order)
        batch, k = ids.shape[0], self.prompt.num_tokens
        offsets = self._offsets(mask)
        index = insertion_index(offsets, ids.shape[1], k)

        def fill(value: torch.Tensor, constant) -> torch.Tensor:
            return splice(value, value.new_full((batch, k), constant), index)

        embeds = self.base.get_input_embeddings()(ids)
        kwargs = {
            "inputs_embeds": splice(embeds, self.prompt(batch).to(embeds.dtype), index),
            "attention_mask": fill(mask, 1),
        }
        if token_type_ids is not None:
            token_type_ids = token_type_ids.gather(1, order)
        kwargs.update(self._extra_inputs(kwargs["attention_mask"], token_type_ids, fill))
        if labels is not None:
            if self.config.task_type is TaskType.CAUSAL_LM:
                labels = fill(labels.gather(1, order), -100)  # virtual tokens never carry a label
            kwargs["labels"] = labels.contiguous()
        return kwargs, order, offsets

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        inputs, order, offsets = self.prompted_inputs(input_ids, attention_mask, token_type_ids, labels)
        out = self.base(**inputs, **kwargs)
        return self._postprocess(out, order, offsets)

    def _postprocess(self, out, order: torch.Tensor, offsets: torch.Tensor):
        return out

    def training_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      labels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """The loss the trainer minimises; families may compute it more cheaply than `forward` does."""
        return self(input_ids, attention_mask, labels=labels, **kwargs).loss

    # -- persistence ---------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint stores: the prompt as the model sees it and, for SEQ_CLS, the head."""
        state = {self.method.tensor_key: self.prompt.served().float().contiguous().cpu()}
        if self.head is not None:
            for name, value in self.head.state_dict().items():
                state[f"{HEAD_PREFIX}{name}"] = value.detach().contiguous().cpu()
        return state

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the prompt (and head) from `state_tensors()` output; nothing else of the model changes."""
        tensors = dict(tensors)
        key = self.method.tensor_key
        prompt = tensors.pop(key, None)
        held = held_by(tensors)
        if prompt is None and held:
            raise SoftpromptError(f"the checkpoint holds {held}, which a {self.config.method} model cannot take; "
                                  "load it with the method it was trained with")
        if prompt is None:
            raise SoftpromptError(f"no '{key}' tensor: not a softprompt checkpoint")
        if prompt.shape != self.prompt.weight.shape:
            raise SoftpromptError(
                f"checkpoint prompt has shape {tuple(prompt.shape)} but this model expects "
                f"{tuple(self.prompt.weight.shape)}: the base model's hidden size or the prompt length differs"
            )
        if self.prompt.reparam is not None:
            raise SoftpromptError("a checkpoint holds the prompt as the model sees it; load it into a model without "
                                  "a residual reparameterisation, prompt encoder or prefix projection (or fold that "
                                  "one first)")
        self.load_head(tensors)
        with torch.no_grad():
            self.prompt.weight.copy_(prompt)

    def load_head(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set a head from the `head.*` tensors of `state_tensors()` output (no head: nothing to set)."""
        if self.head is None:
            return
        head = {name[len(HEAD_PREFIX):]: t for name, t in tensors.items() if name.startswith(HEAD_PREFIX)}
        try:
            self.head.load_state_dict(head)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[-1].strip()
            raise SoftpromptError(f"checkpoint head does not fit this model ({first})") from None

    def save_pretrained(self, directory: str | Path) -> Path:
        """A checkpoint folder of this prompt (and head): what `from_pretrained` reads back onto the same base."""
        name = getattr(self.base.config, "_name_or_path", None) or None
        meta = Checkpoint(self.config, self.family, name, fingerprint(self.base.config))
        return save_checkpoint(directory, meta, self.state_tensors())

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None,
                    commit_message: str = "softprompt checkpoint") -> str:
        """Upload this prompt (and head) to the hub repo `repo_id`, as `save_pretrained` writes it; returns the
        commit's URL."""
        return push_saved(self.save_pretrained, repo_id, private, token, commit_message)

    @classmethod
    def from_pretrained(cls, base_model: PreTrainedModel, directory: str | Path, tokenizer=None) -> "PromptModel":
        """`base_model` (frozen from here on) with the prompt (and head) saved in `directory`, as peft's
        `PeftModel.from_pretrained(model, path)`; the checkpoint's fingerprint must match the base model.
        `directory` may be a peft prompt-tuning adapter folder too, or a hub repo id holding either."""
        directory = local_folder(directory)
        name = type(base_model).__name__
        if is_peft_adapter(directory):
            checkpoint, tensors = read_peft(directory, base_model.config, name)
        else:
            checkpoint = read_checkpoint(directory)
            tensors = load_tensors(directory, checkpoint)
        checkpoint.check_base(base_model.config, name)
        model = get_prompt_model(base_model, checkpoint.prompt, tokenizer, initialise=False)
        if not isinstance(model, cls):
            raise SoftpromptError(f"{directory} holds a {model.family} prompt, not one for {cls.__name__}")
        model.load_tensors(tensors)
        return model
