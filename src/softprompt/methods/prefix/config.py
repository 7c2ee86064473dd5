"""Prefix tuning's settings, under peft's PrefixTuningConfig names (`encoder_hidden_size`, the projection's hidden
width, is P-tuning's field of that name)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class PrefixFields:
    prefix_projection: bool = False  # train through Embedding -> Linear-Tanh-Linear, folded into keys/values at save
