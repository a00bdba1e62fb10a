"""The HTTP service (FastAPI). Never imports torch: model work happens in `worker/` processes."""
