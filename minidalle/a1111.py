"""AUTOMATIC1111's vocabulary (stable-diffusion-webui): its sampler and schedule names, `<lora:name:weight>` prompt
tags, the `parameters` infotext its readers parse, and the LoRA hash it shows. Torch-free: the API speaks it too.

Our samplers (`minidalle.params.SCHEDULERS`) are named the community's way (`dpmpp_2m_karras`); A1111 names the
sampler and its noise schedule apart (`DPM++ 2M` + `Schedule type: Karras`). `SAMPLERS` is the one table between the
two; A1111 writes "Automatic" for a sampler's own schedule, which for the DPM++ family is Karras.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from minidalle.errors import InvalidInput
from minidalle.params import ADAPTER_NAME_RE, SCHEDULERS


@dataclass(frozen=True)
class Sampler:
    label: str  # A1111's name
    aliases: tuple[str, ...]  # its k-diffusion names and older spellings, as A1111 lists them
    schedules: dict[str, str]  # A1111 schedule type (lower case) -> our sampler; "automatic" is the sampler's own


SAMPLERS: tuple[Sampler, ...] = (
    Sampler("DPM++ 2M", ("k_dpmpp_2m", "dpmpp_2m"), {"automatic": "dpmpp_2m_karras", "karras": "dpmpp_2m_karras",
                                                      "uniform": "dpmpp_2m"}),
    Sampler("Euler a", ("k_euler_a", "k_euler_ancestral", "euler_ancestral"), {"automatic": "euler_ancestral"}),
    Sampler("Euler", ("k_euler", "euler"), {"automatic": "euler"}),
    Sampler("Heun", ("k_heun", "heun"), {"automatic": "heun"}),
    Sampler("DPM2", ("k_dpm_2", "kdpm2"), {"automatic": "kdpm2"}),
    Sampler("DPM++ 2S", ("dpmpp_2s",), {"automatic": "dpmpp_2s"}),
    Sampler("DDIM", ("ddim",), {"automatic": "ddim"}),
    Sampler("DDPM", ("ddpm",), {"automatic": "ddpm"}),
    Sampler("PLMS", ("pndm",), {"automatic": "pndm"}),
    Sampler("UniPC", ("unipc",), {"automatic": "unipc"}),
    Sampler("DEIS", ("deis",), {"automatic": "deis"}),
)
# every A1111 schedule type that A1111 lists, with its label: those a sampler above lacks are refused by name
SCHEDULE_LABELS = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras", "exponential": "Exponential",
                   "polyexponential": "Polyexponential", "sgm_uniform": "SGM Uniform", "kl_optimal": "KL Optimal",
                   "align_your_steps": "Align Your Steps", "simple": "Simple", "normal": "Normal", "ddim": "DDIM",
                   "beta": "Beta"}
_BY_NAME = {n.lower(): s for s in SAMPLERS for n in (s.label, *s.aliases)}
# A1111 before 1.9 put the schedule in the sampler's name ("DPM++ 2M Karras")
_LEGACY_SCHEDULE = {"karras": " karras", "exponential": " exponential"}
assert {o for s in SAMPLERS for o in s.schedules.values()} == set(SCHEDULERS), "every sampler has an A1111 name"


def sampler_from_a1111(sampler: str | None, schedule: str | None = None, *, field: str = "sampler_name",
                       schedule_field: str = "scheduler") -> str | None:
    """Our sampler for A1111's (`sampler_name`, `scheduler`); None = the model's own (no sampler named).
    Our own names are accepted as well. Unknown names are an InvalidInput naming the field."""
    if not sampler:
        if schedule and schedule.lower() not in ("automatic", ""):
            raise InvalidInput(schedule_field, f"a schedule type needs a sampler_name; got {schedule!r} alone")
        return None
    key = sampler.strip().lower()
    if key in SCHEDULERS:
        return key
    wanted = (schedule or "automatic").strip().lower() or "automatic"
    if key not in _BY_NAME:
        for name, suffix in _LEGACY_SCHEDULE.items():
            if key.endswith(suffix) and key[: -len(suffix)] in _BY_NAME:
                key, wanted = key[: -len(suffix)], name
                break
    found = _BY_NAME.get(key)
    if found is None:
        raise InvalidInput(field, f"unknown sampler {sampler!r}; choose one of {', '.join(s.label for s in SAMPLERS)}")
    if wanted not in found.schedules:
        known = ", ".join(SCHEDULE_LABELS.get(s, s) for s in found.schedules)
        raise InvalidInput(schedule_field, f"{found.label} runs with schedule type {known}, not {schedule!r}")
    return found.schedules[wanted]


def sampler_to_a1111(name: str) -> tuple[str, str]:
    """(A1111 sampler name, schedule type label) for one of our samplers; other names (a model's own scheduler
    class) are passed through with the Automatic schedule."""
    for s in SAMPLERS:
        for schedule, ours in s.schedules.items():
            if ours == name and (schedule != "automatic" or list(s.schedules.values()).count(ours) == 1):
                return s.label, SCHEDULE_LABELS[schedule]
    return name, "Automatic"


# <lora:name>, <lora:name:weight>; A1111's other forms (te/unet weights, named arguments) are refused by name
_TAG = re.compile(r"<lora:([^<>]*)>", re.IGNORECASE)
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")


def split_lora_tags(prompt: str, *, field: str = "prompt") -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its `<lora:name:weight>` tags, and the tags as (name, weight) in order (weight 1 when
    left out), as A1111 reads them. A malformed tag, or one name twice, is an InvalidInput naming `field`."""
    found: list[tuple[str, float]] = []
    for m in _TAG.finditer(prompt):
        parts = [p.strip() for p in m.group(1).split(":")]
        name, rest = parts[0], parts[1:]
        if not ADAPTER_NAME_RE.match(name):
            raise InvalidInput(field, f"{m.group(0)!r}: the adapter name must be 1-64 letters, digits, '-' or '_'")
        if len(rest) > 1 or (rest and not _NUMBER.match(rest[0])):
            raise InvalidInput(field, f"{m.group(0)!r}: write <lora:{name}> or <lora:{name}:WEIGHT> with one number "
                               "(text-encoder weights and named arguments are not supported)")
        weight = float(rest[0]) if rest else 1.0
        if any(n == name for n, _ in found):
            raise InvalidInput(field, f"<lora:{name}> is given twice; give it once, with the weight you want")
        found.append((name, weight))
    text = _TAG.sub("", prompt) if found else prompt
    return (re.sub(r"[ \t]{2,}", " ", text).strip(" \t,") if found else text), found


def lora_tags(adapters) -> str:
    """`<lora:name:weight>` for each (name, weight), as A1111 writes them after the prompt."""
    return " ".join(f"<lora:{name}:{weight:g}>" for name, weight in adapters)


def addnet_hash(path: str | os.PathLike) -> str:
    """The LoRA hash A1111 shows (`Lora hashes`, civitai's AutoV3): sha256 of a safetensors file's tensor bytes (after
    its header), first 12 hex digits."""
    path = Path(path)
    st = path.stat()
    return _addnet_hash(str(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _addnet_hash(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n)
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:12]


def _quote(value) -> str:
    """A1111's infotext quoting: a value with a comma, colon or quote is written as a JSON string."""
    import json

    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:"\n') else text


def infotext(meta: dict, *, version: str | None = None) -> str:
    """The A1111 `parameters` text of an image: the prompt with its `<lora:…>` tags, a `Negative prompt:` line,
    then `Steps, Sampler, Schedule type, CFG scale, Seed, Size, Model hash, Model, Lora hashes, Version`."""
    adapters = meta.get("adapters") or []
    prompt = meta.get("prompt", "")
    if adapters:
        prompt = f"{prompt} {lora_tags(adapters)}".strip()
    lines = [prompt]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    sampler, schedule = sampler_to_a1111(str(meta.get("scheduler", "")))
    model_hash = meta.get("model_hash")
    hashes = meta.get("lora_hashes") or {}
    pairs = [("Steps", meta.get("steps")), ("Sampler", sampler), ("Schedule type", schedule),
             ("CFG scale", meta.get("guidance_scale")), ("Seed", meta.get("seed")),
             ("Size", f"{meta.get('width')}x{meta.get('height')}"),
             ("Model hash", model_hash[:10] if model_hash else None), ("Model", meta.get("model")),
             ("Lora hashes", ", ".join(f"{n}: {hashes[n]}" for n, _ in adapters if n in hashes) or None),
             ("Version", version)]
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in pairs if v is not None))
    return "\n".join(lines)


def parse_infotext(text: str) -> dict[str, str]:
    """The fields of an infotext (`Prompt`, `Negative prompt` and each `Key: value` of its last line), as A1111's
    png-info answers them."""
    import json

    lines = text.strip("\n").split("\n")
    fields: dict[str, str] = {}
    last = lines[-1] if len(lines) > 1 or "Steps:" in lines[0] else ""
    for m in re.finditer(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', last):
        key, value = m.group(1).strip(), m.group(2).strip()
        if value.startswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        fields[key] = value
    body = lines[:-1] if last else lines
    prompt: list[str] = []
    negative: list[str] = []
    for line in body:
        if line.startswith("Negative prompt:") or negative:
            negative.append(line.removeprefix("Negative prompt:").strip() if not negative else line)
        else:
            prompt.append(line)
    return {"Prompt": "\n".join(prompt), **({"Negative prompt": "\n".join(negative)} if negative else {}), **fields}
