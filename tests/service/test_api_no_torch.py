"""The API process never imports torch (it runs on machines without a GPU stack, and starts fast)."""

from __future__ import annotations

import subprocess
import sys

from _support.servers import REPO


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
                         cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    return set(out.stdout.split())


def test_service_main_does_not_import_torch():
    modules = _modules_after("import service.main\nservice.main.app.openapi()")
    assert "service.main" in modules and "fastapi" in modules
    assert "torch" not in modules
    assert "diffusers" not in modules and "minidalle.pipeline" not in modules


def test_model_info_and_enqueue_side_do_not_import_torch():
    code = ("from service.model_info import get_model_info\n"
            "info = get_model_info('')\nassert info.count_tokens('a red circle') > 0\n"
            "import jobs.queue, jobs.store, jobs.requests, jobs.presence, jobs.metrics, jobs.volume, service.serve\n"
            "import worker.celery_app")
    modules = _modules_after(code)
    assert "worker.celery_app" in modules and "jobs.requests" in modules and "transformers" in modules
    assert "torch" not in modules
