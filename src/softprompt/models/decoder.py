"""Decoder-only causal LMs (Llama, Qwen, Mistral, GPT-2, ...).

Rows are left-aligned and the prompt goes right before each row's first real token:
pads p1..pk text. Position ids count real tokens only, so left and right padding give identical
results, the last column is always a real token (generation and last-token pooling rely on it), and the
first real token's loss is predicted from the last virtual token, exactly as without padding.

Shared prefix: attention is causal and the prompt comes first, so its keys and values at every layer do
not depend on the input. The label loss, rank classification and a head over the last token run the
prompt once per step (packed with the rows in training; a batch of one whose keys/values reach every row
through the transformers cache otherwise), instead of pushing k extra tokens through the model per
example. Under no_grad the prompt's keys/values are kept until the prompt changes. Models whose cache or
output head is not plain (sliding windows, logit soft-capping) use the concatenated sequence instead,
said once in the log.
"""

from __future__ import annotations

import inspect
import logging

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from ..config import TaskType
from .attention import can_pack, grouped_attention, packed_attention
from .base import PromptModel, align_order
from .lm_loss import lm_cross_entropy

log = logging.getLogger(__name__)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class DecoderPromptModel(PromptModel):
    pad_side = "left"
    family = "decoder"

    def _offsets(self, mask: torch.Tensor) -> torch.Tensor:
        return mask.shape[1] - mask.long().sum(1)

    def _extra_inputs(self, mask, token_type_ids, fill) -> dict:
        return {"position_ids": positions_from_mask(mask)}

    def _postprocess(self, out, order, offsets):
        """Give back logits for the caller's own tokens, in the caller's own layout (no virtual columns)."""
        if self.config.task_type is not TaskType.CAUSAL_LM or getattr(out, "logits", None) is None:
            return out
        # column of aligned token j in the spliced sequence: j before the prompt, j + k after it
        j = torch.arange(order.shape[1], device=order.device).unsqueeze(0)
        token_cols = torch.where(j < offsets.unsqueeze(1), j, j + self.prompt.num_tokens)
        logits = out.logits.gather(1, token_cols.unsqueeze(-1).expand(-1, -1, out.logits.shape[-1]))
        out.logits = logits.gather(1, torch.argsort(order, dim=1).unsqueeze(-1).expand_as(logits))
        return out

    # -- shared prefix --------------------------------------------------------------------------------
    def shared_prefix_reason(self) -> str | None:
        """Why this model cannot share the prompt's keys/values across a batch (None: it can; a sliding
        window is checked per call, `_use_shared_prefix`)."""
        config = self.base.config.get_text_config()
        if self.config.task_type not in (TaskType.CAUSAL_LM, TaskType.SEQ_CLS) or not self.prompt.num_tokens:
            return "no prompt to share"
        if getattr(config, "final_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None):
            return "logit soft-capping"
        if any(name.endswith("sinks") for name, _ in self.base.named_parameters()):
            return "attention sinks"
        try:
            layers = DynamicCache(config=self.base.config).layers
        except Exception as error:  # noqa: BLE001 - a config transformers' cache cannot lay out
            return f"no standard cache for it ({type(error).__name__}: {error})"
        if any("LinearAttention" in type(layer).__name__ for layer in layers):
            return "state-space or linear-attention layers"  # a packed row's state would run on into the next
        if self._cache_kwarg() is None:
            return f"{type(self.base.base_model).__name__} takes no cache"
        return None

    def _use_shared_prefix(self, length: int) -> bool:
        """Whether a call over `length` tokens per row (input plus anything generated after it) shares the
        prompt. With a sliding window only if prompt + row fit in it: then the window hides nothing, and
        attention is the full causal attention the shared prefix computes."""
        if not hasattr(self, "_shared_reason"):
            self._shared_reason = self.shared_prefix_reason() or self._probe_mismatch()
            if self._shared_reason and self._shared_reason != "no prompt to share":
                log.warning("softprompt: %s cannot share the prompt across the batch (%s); using the concatenated "
                            "sequence", type(self.base).__name__, self._shared_reason)
        window = getattr(self.base.config.get_text_config(), "sliding_window", None)
        if self._shared_reason is None and window and self.prompt.num_tokens + length > window:
            if not getattr(self, "_window_logged", False):
                self._window_logged = True
                log.warning("softprompt: %d virtual + %d input tokens exceed %s's sliding window of %d; such "
                            "batches use the concatenated sequence", self.prompt.num_tokens, length,
                            type(self.base).__name__, window)
            return False
        return self._shared_reason is None

    def _probe_mismatch(self) -> str | None:
        """Check the shared prefix against the concatenation once, on two ragged rows, before trusting it: a
        model whose attention does something the engine does not model (a bias, a custom kernel) then takes
        the concat instead of giving silently different results. None when both paths agree."""
        window = getattr(self.base.config.get_text_config(), "sliding_window", None)
        n = min(5, window - self.prompt.num_tokens) if window else 5
        if n < 2:
            return "a sliding window shorter than the prompt + 2 tokens"
        device = self.base.get_input_embeddings().weight.device
        vocab = self.base.get_input_embeddings().num_embeddings
        ids = (torch.arange(2 * n, device=device).view(2, n) * 7 + 100) % vocab
        mask = torch.ones_like(ids)
        mask[0, :2] = 0  # left-padded, so the rows differ in length
        training = self.base.training
        self.base.eval()  # no dropout in either path
        # what is compared: the LM's logits (so a head beyond the output embeddings, or a rescaling, shows), or
        # the states a classification head reads
        lm = self.config.task_type is TaskType.CAUSAL_LM
        try:
            with torch.no_grad():
                inputs, _, _ = self.prompted_inputs(ids, mask)
                out = self.base(**inputs).logits if lm else self.base.base_model(**inputs).last_hidden_state
                want = out[:, -2:].float()
            try:
                ids, mask, _ = self._aligned(ids, mask)
                got = []
                for grad in (True, False):  # a training step's path (packed), inference's (kept keys/values)
                    with torch.set_grad_enabled(grad):
                        hidden = self._shared_hidden(ids, mask)[0][:, -2:]
                        got.append((self._lm_logits(hidden) if lm else hidden).detach().float())
            except Exception as error:  # noqa: BLE001 - any failure means: use the concat
                return f"the shared prefix failed on a probe batch ({type(error).__name__}: {error})"
        finally:
            self.base.train(training)
        gap = max(float((g - want).abs().max()) for g in got) / max(float(want.abs().max()), 1e-6)
        half = inputs["inputs_embeds"].dtype != torch.float32 or torch.is_autocast_enabled(device.type)
        # fp32 paths agree to ~1e-6. In bf16 they round differently (SmolLM2: 2e-2), so there only gross
        # differences (a missing head, cross-row leakage) show
        tolerance = 1e-1 if half else 1e-4
        if gap > tolerance:
            return f"on a probe batch it differed from the concatenation by {gap:.1e} (relative)"
        return None

    def _cache_kwarg(self) -> str | None:
        """The backbone's name for the cache argument (transformers renamed past_key_values to cache)."""
        params = inspect.signature(self.base.base_model.forward).parameters
        return next((name for name in ("cache", "past_key_values") if name in params), None)

    def _logit_scale(self) -> float:
        """What the model's own forward multiplies the LM head's output by: Cohere multiplies by
        `logit_scale`, Granite divides by `logits_scaling`; the shared prefix applies the head itself."""
        config = self.base.config.get_text_config()
        return (getattr(config, "logit_scale", None) or 1.0) / (getattr(config, "logits_scaling", None) or 1.0)

    def _lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.base.get_output_embeddings()(hidden)
        scale = self._logit_scale()
        return logits if scale == 1.0 else logits * scale

    def _prompt_states(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Per-layer keys/values of the prompt alone and its last hidden state; kept under no_grad."""
        key = self.prompt.version()
        cached = getattr(self, "_prompt_kv", None)
        if not torch.is_grad_enabled() and cached is not None and cached[0] == key:
            return cached[1], cached[2]
        k = self.prompt.num_tokens
        cache = DynamicCache(config=self.base.config)
        dtype = self.base.get_input_embeddings().weight.dtype
        prompt = self.prompt.embeddings()
        positions = torch.arange(k, device=prompt.device)[None]
        out = self.base.base_model(inputs_embeds=prompt[None].to(dtype), position_ids=positions, use_cache=True,
                                   **{self._cache_kwarg(): cache})
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        last = out.last_hidden_state[:, -1:]
        if not torch.is_grad_enabled():
            self._prompt_kv = (key, layers, last)
        return layers, last

    def _run_cached(self, layers, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor):
        """Run tokens after cached keys/values (expanded to the batch); `mask` covers cache and tokens."""
        cache = DynamicCache(config=self.base.config)
        for i, (keys, values) in enumerate(layers):
            cache.update(keys.expand(input_ids.shape[0], -1, -1, -1), values.expand(input_ids.shape[0], -1, -1, -1), i)
        with grouped_attention(self.base):
            out = self.base.base_model(inputs_embeds=self.base.get_input_embeddings()(input_ids), attention_mask=mask,
                                       position_ids=positions, use_cache=True, **{self._cache_kwarg(): cache})
        return out.last_hidden_state, [(layer.keys, layer.values) for layer in cache.layers]

    def _aligned(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        """The caller's batch left-aligned (what every shared-prefix path runs on), and the permutation used."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        order = align_order(attention_mask, self.pad_side)
        return input_ids.gather(1, order), attention_mask.gather(1, order), order

    def _shared_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_cache: bool = False):
        """Hidden states of the (left-aligned) tokens attending to the shared prompt, the prompt's last state
        (which predicts each row's first real token), and, with `keep_cache`, the keys/values of prompt +
        tokens. A training step runs prompt and rows packed into one sequence; otherwise the rows run after
        the prompt's (kept) keys/values."""
        k = self.prompt.num_tokens
        full_mask = torch.cat([attention_mask.new_ones(input_ids.shape[0], k), attention_mask], 1)
        positions = positions_from_mask(full_mask)[:, k:]
        if torch.is_grad_enabled() and not keep_cache and can_pack(self.base):
            return (*self._packed_hidden(input_ids, attention_mask, positions), None)
        layers, last = self._prompt_states()
        hidden, layers = self._run_cached(layers, input_ids, full_mask, positions)
        return hidden, last, (layers, full_mask, positions[:, -1:])

    def _packed_hidden(self, input_ids, attention_mask, positions):
        """One forward over prompt + every row as a single sequence of k + B*n; see attention.packed_sdpa."""
        k, (rows, n) = self.prompt.num_tokens, input_ids.shape
        embeds = self.base.get_input_embeddings()(input_ids)
        packed = torch.cat([self.prompt.embeddings().to(embeds.dtype), embeds.flatten(0, 1)])[None]
        packed_positions = torch.cat([torch.arange(k, device=positions.device), positions.flatten()])[None]
        with packed_attention(self.base, k, attention_mask):
            hidden = self.base.base_model(inputs_embeds=packed, position_ids=packed_positions,
                                          use_cache=False).last_hidden_state[0]
        return hidden[k:].view(rows, n, -1), hidden[None, k - 1:k]

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        """With a head, the last real token's state through the shared prefix, as the model's own
        last-token pooling and loss on the concatenated sequence would give; other outputs take the concat."""
        if self.config.task_type is not TaskType.SEQ_CLS or kwargs or not self._use_shared_prefix(input_ids.shape[1]):
            return super().forward(input_ids, attention_mask, token_type_ids, labels, **kwargs)
        hidden, _, _ = self._shared_hidden(*self._aligned(input_ids, attention_mask)[:2])
        logits = self.head(hidden[:, -1])  # left-aligned: the last column is each row's last real token
        loss = None
        if labels is not None:
            loss = self.base.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.base.config)
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits)

    def continuation_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            continuations: list[list[int]]) -> list[torch.Tensor] | None:
        """For each continuation (the same token list after every row), the logits predicting its tokens.

        Prompt and input run once; each continuation then runs only its own tokens from their keys/values
        (rank classification of multi-token label strings). None where the model cannot share a prefix.
        """
        if not self._use_shared_prefix(input_ids.shape[1] + max(map(len, continuations), default=0)):
            return None
        hidden, _, (layers, mask, last_position) = self._shared_hidden(*self._aligned(input_ids, attention_mask)[:2],
                                                                       keep_cache=True)
        out = []
        for tokens in continuations:
            states = [hidden[:, -1:]]  # the input's last token predicts the continuation's first
            if len(tokens) > 1:
                ids = torch.tensor([tokens[:-1]] * hidden.shape[0], device=hidden.device)
                more = torch.cat([mask, mask.new_ones(ids.shape)], dim=1)
                steps = last_position + 1 + torch.arange(ids.shape[1], device=ids.device)
                states.append(self._run_cached(layers, ids, more, steps)[0])
            out.append(self._lm_logits(torch.cat(states, dim=1)))
        return out

    def _tail_hidden(self, input_ids, attention_mask, keep: int) -> torch.Tensor | None:
        """States of the last `keep` aligned columns via the shared prefix, or None where the concat path must
        serve (the tail would reach into the prompt of a short row)."""
        ids, mask, _ = self._aligned(input_ids, attention_mask)
        if not self._use_shared_prefix(ids.shape[1]) or keep > int(mask.sum(1).min()):
            return None
        hidden, _, _ = self._shared_hidden(ids, mask)
        return hidden[:, -keep:]

    def tail_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, keep: int) -> torch.Tensor:
        """Logits of the last `keep` columns only (real tokens, after left alignment).

        The LM head over a 49k vocabulary at every position costs as much as several layers; label
        words sit at the end of each row, so scoring and the label loss need only the tail.
        """
        hidden = self._tail_hidden(input_ids, attention_mask, keep)
        if hidden is not None:  # a contiguous copy: on a strided view the head runs as a batched matmul, 5x slower
            return self._lm_logits(hidden.contiguous())
        inputs, _, _ = self.prompted_inputs(input_ids, attention_mask)
        width = inputs["inputs_embeds"].shape[1]  # indices rather than a count, for the same reason
        return self.base(**inputs, logits_to_keep=torch.arange(width - keep, width, device=input_ids.device)).logits

    def training_loss(self, input_ids, attention_mask=None, labels=None, **kwargs) -> torch.Tensor:
        """Mean next-token cross-entropy over labelled tokens, as `forward(...).loss`, from the tail only."""
        if self.config.task_type is not TaskType.CAUSAL_LM:
            return super().training_loss(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        ids, mask, order = self._aligned(input_ids, attention_mask)
        aligned = labels.gather(1, order)
        labelled = aligned != -100
        if self._use_shared_prefix(ids.shape[1]):
            # the state that predicts column j: column j-1's, or the prompt's last for each row's first real token
            hidden, last, _ = self._shared_hidden(ids, mask)
            before = torch.cat([last.expand(hidden.shape[0], 1, -1), hidden[:, :-1]], dim=1)
            first_real = (mask.cumsum(1) == 1) & (mask == 1)
            before = torch.where(first_real.unsqueeze(-1), last, before)
            # the LM head only where there is a label, and without keeping the logits
            return lm_cross_entropy(before[labelled], self.base.get_output_embeddings(), aligned[labelled],
                                    self._logit_scale())
        width = aligned.shape[1]
        first = torch.where(labelled.any(1), labelled.int().argmax(1), width)  # first labelled column per row
        keep = int((width - first).max()) + 1
        if keep > int(mask.sum(1).min()):  # a row's first real token is labelled: the prompt end predicts it
            return self(input_ids, attention_mask, labels=labels, **kwargs).loss
        logits = self.tail_logits(input_ids, attention_mask, keep)
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                 aligned[:, width - keep + 1:].flatten(), ignore_index=-100)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 20, **kwargs) -> torch.Tensor:
        """Continuation after prompt + input; returns only the new token ids.

        Greedy decoding runs from the kept prompt keys/values; sampling and other `generate` options go
        through transformers' `generate` on the concatenated sequence."""
        if kwargs.get("do_sample") or not self._use_shared_prefix(input_ids.shape[1] + max_new_tokens):
            inputs, _, _ = self.prompted_inputs(input_ids, attention_mask)
            inputs.pop("position_ids")
            return self.base.generate(**inputs, max_new_tokens=max_new_tokens, **kwargs)
        hidden, _, (layers, mask, position) = self._shared_hidden(*self._aligned(input_ids, attention_mask)[:2],
                                                                  keep_cache=True)
        new = []
        for _ in range(max_new_tokens):
            token = self._lm_logits(hidden[:, -1]).argmax(-1, keepdim=True)
            new.append(token)
            mask, position = torch.cat([mask, mask.new_ones(token.shape)], dim=1), position + 1
            hidden, layers = self._run_cached(layers, token, mask, position)
        return torch.cat(new, dim=1)
