"""`softprompt serve`: one frozen model answering many tasks over HTTP, prompts added and removed while it runs.

Every request's rows go through one dynamic batcher, so concurrent requests for any mix of tasks become one
`MultiTaskModel.predict` call on one worker thread. Requests are checked (key, body size, number and length of
inputs, tasks, fields) before they queue, so bad input never reaches a batch, and every error is a JSON
`{"detail": "one line"}` with a 4xx status. OpenAI's API (`/v1/completions`, `/v1/chat/completions`, `/v1/models`,
with OpenAI's error object) and Prometheus' (`/metrics`) are spoken too. docs/serving.md says what each module
does.
"""

from .app import create_app
from .options import ServeOptions
from .server import app_from_env, serve
from .sources import load_model, resolve_sources

__all__ = ["create_app", "load_model", "serve", "app_from_env", "resolve_sources", "ServeOptions"]
