"""`bench/gpu.py`, the script for the day a GPU is lent, runs end to end here on the CPU at a tiny size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_bench_runs_end_to_end_on_cpu():
    cmd = [sys.executable, str(REPO / "bench" / "gpu.py"), "--size", "64", "--steps", "2", "--batches", "1,2",
           "--repeats", "1", "--train-steps", "2", "--train-batch", "2", "--service-model", "embedded",
           "--fast-path", "off"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    gen = result["generation"]
    assert set(gen) == {"1", "2"} and gen["2"]["images"] == 2
    for row in gen.values():
        assert row["minidalle_s_per_image"] > 0 and row["diffusers_s_per_image"] > 0
        assert row["max_pixel_diff_255"] == 0.0  # the same modules, the same seeds: the same pixels
    assert result["training"]["samples_per_s"] > 0 and result["service"]["s_per_image"] > 0
    assert result["peak_memory_gib"] > 0 and result["knobs"] == dict(channels_last=False, fuse_qkv=False,
                                                                      vae_slicing=False, vae_tiling=False,
                                                                      compile_unet=False)
    assert set(result["goals"]) == {"batch1_s_per_image", "batched_s_per_image", "train_samples_per_s"}
