"""The web page: `GET /` and its files under `/ui/` (plain HTML, CSS and JavaScript in `service/static`, no build
step, nothing fetched from elsewhere). The page is a client of the JSON API like any other: it sends the API key the
user gives it, so the page itself needs none.

`/ui/params.json` gives the page every form field's default, bounds, choices and help, from `minidalle.params` (the
one definition), with the operator's caps and the model's native size.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from minidalle.params import FINETUNE, GENERATE, Param
from service.deps import SettingsDep
from service.errors import not_found

router = APIRouter(include_in_schema=False)
STATIC = Path(__file__).resolve().parents[1] / "static"
SCRIPTS = ("app.js", "api.js", "ui.js", "generate.js", "finetune.js", "adapters.js")  # ES modules
FILES = {**{name: "text/javascript; charset=utf-8" for name in SCRIPTS}, "app.css": "text/css; charset=utf-8",
         "icon.svg": "image/svg+xml"}
# The page and its files change with a release, not a deploy: revalidate each time (an ETag makes that a 304).
CACHE = "no-cache"
# Only this origin, nothing inline, no frames: the page can't be made to load or send anything elsewhere.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@lru_cache(maxsize=8)
def _read(name: str, mtime_ns: int) -> tuple[bytes, str]:
    body = (STATIC / name).read_bytes()
    return body, '"' + hashlib.sha256(body).hexdigest()[:20] + '"'


def _file(request: Request, name: str, media_type: str) -> Response:
    body, etag = _read(name, (STATIC / name).stat().st_mtime_ns)
    headers = {"ETag": etag, "Cache-Control": CACHE, "X-Content-Type-Options": "nosniff"}
    if name == "index.html":
        headers.update({"Content-Security-Policy": CSP, "Referrer-Policy": "no-referrer"})
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=media_type, headers=headers)


@router.get("/")
def index(request: Request) -> Response:
    """The page."""
    return _file(request, "index.html", "text/html; charset=utf-8")


@router.get("/ui/params.json")
def params(request: Request, settings: SettingsDep) -> JSONResponse:
    """Every field of the page's forms: default, bounds, choices, help; the caps; the model's native size."""
    info = getattr(request.app.state, "model_info", None)
    size = info.default_size if info is not None else None
    caps = {"num_images": settings.max_images, "num_inference_steps": settings.max_steps,
            "width": settings.max_width or (2 * size if size else None),
            "height": settings.max_height or (2 * size if size else None),
            "steps": settings.max_train_steps, "batch_size": settings.max_train_batch_size,
            "resolution": settings.max_train_resolution}
    body = {"generate": {p.api_name: _param(p, caps) for p in GENERATE.values() if p.api_name},
            "finetune": {p.api_name: _param(p, caps) for p in FINETUNE.values() if p.api_name},
            "native_size": size, "max_upload_bytes": settings.max_upload_bytes}
    return JSONResponse(body, headers={"Cache-Control": CACHE})


def _param(p: Param, caps: dict) -> dict:
    hi = p.le  # an exclusive bound (`lt`) is left to the API, which names it when it is crossed
    cap = caps.get(p.api_name or "")
    if cap is not None:
        hi = min(hi, cap) if hi is not None else cap
    default = list(p.default) if p.max_items is not None else p.default
    return {"type": p.type.__name__, "default": default, "help": p.help, "min": p.ge if p.ge is not None else p.gt,
            "max": hi, "step": p.multiple_of, "choices": list(p.choices) if p.choices else None,
            "nullable": p.nullable, "max_items": p.max_items}


@router.get("/ui/{name}")
def static_file(request: Request, name: str) -> Response:
    """The page's script, style sheet and icon (a fixed list: no other file is reachable)."""
    if name not in FILES:
        raise not_found(f"{name!r} not found")
    return _file(request, name, FILES[name])
