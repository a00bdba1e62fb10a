"""Exceptions shared by the pipeline, the trainer and their callers."""


class Cancelled(Exception):  # noqa: N818 - reads naturally at the raise site: `raise Cancelled()`
    """Raised by a progress callback to stop generation or training at the next step boundary.

    The pipeline lets it propagate (no images are returned); the trainer first saves a checkpoint, then re-raises.
    """
