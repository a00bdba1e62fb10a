"""Exceptions shared by the library, the CLI, the job contract and the API. Torch-free."""

from __future__ import annotations


class Cancelled(Exception):  # reads naturally at the raise site: `raise Cancelled()`
    """Raised by a progress callback to stop generation or training at the next step boundary.

    The pipeline lets it propagate (no images are returned); the trainer first saves a checkpoint, then re-raises.
    """


class InvalidInput(ValueError):
    """Bad input, with the field it concerns as data: the library raises it before any model work, the CLI shows
    it as one line naming the flag, the API as a 422 naming the body field.

    `field` is the library's name (`num_inference_steps`, `adapters.0.name`, a dataset file's relative path, ...);
    `str(e)` is `"{field}: {message}"`, so a plain `except ValueError` still reads well.
    """

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message
