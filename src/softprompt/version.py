"""softprompt's version, read by the package, by pyproject.toml (dynamic) and by every checkpoint it writes."""

__version__ = "0.2.0"
