"""What each route accepts, as pydantic models: anything else is refused (422) before a route runs."""

from __future__ import annotations

from typing import Union, cast

from pydantic import BaseModel, ConfigDict, Field, model_validator

Input = Union[str, dict[str, str]]
UNION_TAGS = ("str", "dict[str,str]")  # how pydantic names Input's branches in an error's location
INPUT_IS = "an input is a text, or an object with a text for each of the task's fields"


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str
    input: Input


class PredictBody(BaseModel):
    """`{task, inputs}` for one task, or `{items: [{task, input}]}` for a mix."""
    model_config = ConfigDict(extra="forbid")
    task: str | None = None
    inputs: list[Input] | None = Field(None, min_length=1)
    items: list[Item] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def one_form(self) -> "PredictBody":
        if (self.items is None) == (self.inputs is None) or (self.task is None) != (self.inputs is None):
            raise ValueError("give either task and inputs, or items")
        return self

    def pairs(self) -> list[tuple[str, Input]]:
        if self.items is not None:
            return [(item.task, item.input) for item in self.items]
        return [(cast(str, self.task), i) for i in self.inputs or []]


class GenerateBody(PredictBody):
    max_new_tokens: int = Field(20, ge=1, description="at most the server's --max-new-tokens")


class PromptBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1, description="checkpoint folder on the server's disk, or a hub repo id")
    task: str | None = Field(None, min_length=1, description="the task's name (default: the checkpoint's)")
    member: str | None = Field(None, min_length=1, description="name within an ensemble of prompts for one task")
