"""What the OpenAI-compatible routes accept: OpenAI's request bodies. The fields this server acts on are declared
and checked (a wrong type or range: 422, naming the field); any other field passes pydantic and is then refused by
name (`refused`, 400), unless it holds its neutral value (n=1, echo=false, ...), which client libraries may send
whatever the user asked."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..multitask import Sampling

# fields this server does not act on, and the values that ask for nothing (null always does)
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,), "best_of": (1,), "echo": (False,), "suffix": ("",), "presence_penalty": (0,),
    "frequency_penalty": (0,), "logit_bias": ({},), "tools": ([],), "functions": ([],), "tool_choice": ("none",),
    "function_call": ("none",), "parallel_tool_calls": (True, False), "response_format": ({"type": "text"},),
    "modalities": (["text"],), "store": (False,), "metadata": ({},)}
WHY = {"n": "one choice per input (several prompts make several choices)",
       "tools": "tool calls are not supported", "functions": "function calls are not supported",
       "tool_choice": "tool calls are not supported", "function_call": "function calls are not supported"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class OpenAIBody(BaseModel):
    """What both routes take: the model (a task, or the base model), the sampling and the stream."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, description="a task, or the base model (GET /v1/models)")
    max_tokens: int | None = Field(None, ge=1, description="generate up to this many tokens; none: a task classifies")
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    stop: list[str] | None = Field(None, description="a string or a list: the text ends before the first")
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, as OpenAI's end-user id; unused

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and any(isinstance(s, str) and not s for s in value):
            raise ValueError("a stop string must not be empty")
        return value

    def refused(self) -> tuple[str, str] | None:
        """The first field given that this server does not act on, unless neutral: (its name, why)."""
        for name, value in (self.model_extra or {}).items():
            if value is not None and value not in NEUTRAL.get(name, ()):
                return name, WHY.get(name, "not supported by this server")
        return None

    def sampling(self, max_new_tokens: int) -> Sampling:
        """OpenAI's defaults where a field is not given: temperature 1, top_p 1."""
        return Sampling(max_new_tokens, 1.0 if self.temperature is None else self.temperature,
                        1.0 if self.top_p is None else self.top_p)


class CompletionBody(OpenAIBody):
    prompt: list[str] = Field(min_length=1, description="a text, or a list of texts (a choice each)")
    logprobs: int | None = Field(None, ge=0, le=20, description="a classification answer always carries every "
                                                                "label's")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("give a text or a list of texts (token ids are not supported)")
        return value


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str) and not (
                isinstance(value, list) and all(isinstance(p, dict) for p in value)):
            raise ValueError("give a text or a list of content parts")
        return value

    def text(self) -> str:
        """The content as one text (text parts joined by newlines)."""
        if isinstance(self.content, list):
            return "\n".join(str(part.get("text", "")) for part in self.content)
        return self.content or ""


class ChatBody(OpenAIBody):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="max_tokens' newer name")
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def refused(self) -> tuple[str, str] | None:
        """As for completions, then in the messages: tool messages and calls, parts other than text (images,
        audio, files)."""
        if refused := super().refused():
            return refused
        for i, message in enumerate(self.messages):
            if message.role in ("tool", "function"):
                return f"messages.{i}.role", "tool and function messages are not supported"
            extra = [name for name, value in (message.model_extra or {}).items() if value]
            if extra:
                return f"messages.{i}.{extra[0]}", "not supported by this server"
            content = message.content if isinstance(message.content, list) else []
            parts = [part.get("type") for part in content if part.get("type") != "text"]
            if parts:
                return f"messages.{i}.content", f"{parts[0]} parts are not supported; only text"
        return None

    def asked_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them: text content, a developer message as the system's."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def last_user(self) -> str | None:
        return next((m.text() for m in reversed(self.messages) if m.role == "user"), None)
