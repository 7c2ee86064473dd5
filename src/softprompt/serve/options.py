"""Every option of `softprompt serve`, declared once with its default, help and flag: the CLI's `serve` options are
built from these fields (cli.py), and the app, the model loading and uvicorn read them from here."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SoftpromptError
from ..options import option
from ..devices import DEVICE_HELP, resolve_device
from ..precision import check_dtype


@dataclass(frozen=True)
class ServeOptions:
    """Where the server listens, what it lets in, how it batches, what it loads."""

    host: str = option("127.0.0.1", "address to listen on (loopback unless told otherwise)")
    port: int = option(8000, "port to listen on")
    api_key: str | None = option(None, "require this key on every route but /health", envvar="SOFTPROMPT_API_KEY",
                               show_envvar=True)
    read_only: bool = option(False, "refuse adding and removing prompts over HTTP", flag="--read-only")
    max_batch: int = option(32, "rows per forward at most")
    max_wait_ms: float = option(5, "how long a request waits for others to share its forward")
    max_inputs: int = option(64, "inputs per request at most")
    max_input_chars: int = option(4000, "characters per input (per field) at most")
    max_body_bytes: int = option(1_000_000, "request body size at most")
    max_new_tokens: int = option(256, "tokens generated per input at most (/v1/generate's max_new_tokens, the OpenAI "
                                      "routes' max_tokens)")
    metrics_open: bool = option(False, "serve /metrics without the API key (for a scraper on a trusted network)",
                                flag="--metrics-open")
    watch: str | None = option(None, "serve the checkpoints of DIR (DIR/<task>/ or DIR/<task>/<member>/), following "
                                   "changes", metavar="DIR")
    workers: int = option(1, "worker processes, each with its own copy of the model")
    trust_remote_code: bool = option(False, "let the base model run the code in its repository (only for one you "
                                          "trust)", flag="--trust-remote-code")
    dtype: str | None = option(None, "the frozen model's precision: bf16 | fp32 (default: each checkpoint's own, as "
                                   "it was trained and evaluated)")
    device: str = option("auto", f"where the model computes: {DEVICE_HELP}")

    def __post_init__(self) -> None:
        limits = self.max_batch, self.max_inputs, self.max_input_chars, self.max_body_bytes, self.max_new_tokens
        if min(limits) < 1 or self.max_wait_ms < 0:
            raise SoftpromptError("--max-batch, --max-inputs, --max-input-chars, --max-body-bytes and --max-new-tokens "
                                  "must be at least 1, --max-wait-ms at least 0")
        check_dtype(self.dtype)
        resolve_device(self.device)  # a device that is not there is refused before anything loads
