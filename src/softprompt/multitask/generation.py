"""Generation as a server needs it: what the rows of one call share (`Sampling`), what each row asks (`Wants`: its
seed, its stop strings, its text as it comes, whether anyone still waits for it), and each row's text as its tokens
come (`Progress`), which both loops report every token to: the shared-prefix engine's and transformers' `generate`
(a prompt the engine cannot share, the base model)."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from transformers import StoppingCriteria

from ..engine import Sampler


@dataclass(frozen=True)
class Sampling:
    """What every row of one generation call shares: at most `max_new_tokens` tokens, each the most likely at
    temperature 0 (greedy, `/v1/generate`), else sampled (engine.Sampler). A server batches only rows that share it."""

    max_new_tokens: int = 20
    temperature: float = 0.0
    top_p: float = 1.0

    @property
    def sampler(self) -> Sampler:
        return Sampler(self.temperature, self.top_p)

    def generate_kwargs(self) -> dict[str, Any]:
        """The same settings for transformers' `generate` (its top-k filter off, as the engine has none)."""
        if self.temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}


@dataclass(frozen=True)
class Wants:
    """What one row asks beyond its call's `Sampling`."""

    seed: int | None = None  # the row's draws repeat with the same seed, whatever else shares its batch
    stop: tuple[str, ...] = ()  # the text ends before the first of these, and so does the row's generation
    emit: Callable[[str], None] | None = None  # handed each new piece of text, on the model's thread
    cancelled: threading.Event | None = None  # set once no one waits for the text: the row stops at its next token


@dataclass(frozen=True)
class Generated:
    text: str
    finish_reason: str  # "stop": end-of-text or a stop string; "length": max_new_tokens reached
    tokens: int  # tokens generated, the end-of-text (or the token completing a stop string) included


class Progress:
    """One row's generation as its tokens come (`push`): its text, cut at end-of-text (as `decode_generated` cuts
    it) and at the first stop string, handed to `emit` as it grows, less a tail that may yet change (the start of a
    stop string, an unfinished character); done at either end, at the limit, or once its client is gone."""

    def __init__(self, tokenizer: Any, wants: Wants, max_new_tokens: int) -> None:
        self.tokenizer, self.wants, self.limit = tokenizer, wants, max_new_tokens
        self.ids: list[int] = []  # the tokens before any end-of-text
        self.tokens = 0
        self.reason: str | None = None
        self.text, self.sent = "", ""  # the text so far (read only when a stop string or `emit` needs it); emitted
        self.generator = torch.Generator()  # the engine's draws for this row
        if wants.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(wants.seed)

    @property
    def done(self) -> bool:
        return self.reason is not None or (self.wants.cancelled is not None and self.wants.cancelled.is_set())

    def push(self, token: int) -> bool:
        """The row's next token (ignored once it is done); whether it is done now."""
        if self.done:
            return True
        self.tokens += 1
        if token == self.tokenizer.eos_token_id:
            self.reason = "stop"
        else:
            self.ids.append(token)
        if self.reason is None and self.tokens == self.limit:
            self.reason = "length"
        if self.wants.stop or self.wants.emit:
            self._read()
        return self.done

    def _read(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cuts = [at for at in (text.find(s) for s in self.wants.stop) if at >= 0]
        if cuts:
            text, self.reason = text[:min(cuts)], "stop"
        self.text = text
        if self.wants.emit is None:
            return
        safe = len(text) if self.reason else len(text) - self._unsettled(text)
        # a tokenizer whose decoding of more tokens rewrites earlier text (rare) has its rewrite left out of the stream
        if safe > len(self.sent) and text.startswith(self.sent):
            self.wants.emit(text[len(self.sent):safe])
            self.sent = text[:safe]

    def _unsettled(self, text: str) -> int:
        """How many characters at the end of `text` may still change: the longest start of a stop string there, or
        a character whose bytes have not all come (decoded as U+FFFD)."""
        starts = [k for s in self.wants.stop for k in range(1, len(s)) if text.endswith(s[:k])]
        held = max(starts, default=0)
        while held < len(text) and text[len(text) - held - 1] == "\ufffd":
            held += 1
        return held

    def result(self) -> Generated:
        text = self.text if self.wants.stop or self.wants.emit else self.tokenizer.decode(self.ids,
                                                                                           skip_special_tokens=True)
        return Generated(text, self.reason or "length", self.tokens)


def report(progress: list[Progress], tokens: torch.Tensor) -> torch.Tensor:
    """Each row's new token (B, 1) to its `Progress`; (B,) which rows are done: the engine's `finished`."""
    return torch.tensor([p.push(t) for p, t in zip(progress, tokens[:, 0].tolist())])


class Reporting(StoppingCriteria):
    """transformers' `generate` reporting each new token to its rows' `Progress`, and stopping the rows it says are
    done."""

    def __init__(self, progress: list[Progress]) -> None:
        self.progress = progress

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return report(self.progress, input_ids[:, -1:]).to(input_ids.device)  # type: ignore[return-value]


@contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """torch's global generators seeded with `seed` (and restored after) where one is given: transformers' `generate`
    draws from them, so a seeded row runs alone and repeats."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
