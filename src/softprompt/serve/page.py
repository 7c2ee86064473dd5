"""The pages a browser gets: the playground at / and the form asking for the API key, each one self-contained
HTML file in static/."""

from __future__ import annotations

from importlib import resources

from fastapi.responses import HTMLResponse


def page(name: str, status_code: int = 200) -> HTMLResponse:
    """static/<name>.html (a few KB, read per request)."""
    text = resources.files(__package__).joinpath(f"static/{name}.html").read_text(encoding="utf-8")
    return HTMLResponse(text, status_code=status_code)
