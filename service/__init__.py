"""The HTTP service (FastAPI) and `minidalle serve`. Never imports torch, nor `worker/`: jobs go through the
contract in `jobs/`, model work happens in worker processes."""
