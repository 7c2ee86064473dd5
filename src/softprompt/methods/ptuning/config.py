"""P-tuning's settings, under peft's PromptEncoderConfig names, so a peft P-tuning adapter_config.json reads as is."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import SoftpromptError

ENCODER_TYPES = ("MLP", "LSTM")


@dataclass(kw_only=True)
class PromptEncoderFields:
    """The prompt encoder the virtual tokens come out of while training: an MLP, or a bidirectional LSTM then an
    MLP. `encoder_hidden_size` is also a prefix projection's hidden width (peft's PrefixTuningConfig name)."""

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None  # default: the model's width, as peft's
    encoder_num_layers: int = 2  # LSTM layers (peft's MLP always has 3 linear layers)
    encoder_dropout: float = 0.0  # LSTM dropout between layers

    def check_prompt_encoder(self) -> None:
        self.encoder_reparameterization_type = str(getattr(self.encoder_reparameterization_type, "value",
                                                           self.encoder_reparameterization_type)).upper()
        if self.encoder_reparameterization_type not in ENCODER_TYPES:
            raise SoftpromptError(f"encoder_reparameterization_type must be MLP or LSTM, not "
                                  f"{self.encoder_reparameterization_type!r}")
        if (self.encoder_hidden_size is not None and self.encoder_hidden_size < 1) or self.encoder_num_layers < 1:
            raise SoftpromptError("encoder_hidden_size and encoder_num_layers must be >= 1")
        if not 0 <= self.encoder_dropout < 1:
            raise SoftpromptError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout}")
