"""Checkpoint files of a fine-tune: safetensors for tensors, JSON for the rest (nothing is ever unpickled).

    {work_dir}/checkpoints/step-000100/
      adapter/                 the adapter as of that step (same files as a published one)
      optimizer.safetensors    AdamW state, flattened ("state.{param}.{key}"), plus torch's RNG state
      trainer_state.json       step, optimizer scalars + param groups, LR schedule, grad scaler, dataset hash, config
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch


def latest_checkpoint(work_dir: Path) -> Path | None:
    root = Path(work_dir) / "checkpoints"
    done = sorted(p for p in root.glob("step-*") if (p / "trainer_state.json").is_file()) if root.is_dir() else []
    return done[-1] if done else None


def step_of(path: Path) -> int:
    return int(path.name.split("-")[-1])


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return None  # functions (lr lambdas) are rebuilt, not stored


def flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": jsonable(sd["param_groups"]), "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict, device) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, idx, k = key.split(".", 2)
        state.setdefault(int(idx), {})[k] = v.to(device) if k != "step" else v
    for key, v in meta.get("scalars", {}).items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}
