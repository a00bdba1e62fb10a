"""The work behind `minidalle generate | finetune | info`: load, run with a progress bar, write, print.

`minidalle.cli` parses the arguments and turns errors into one line; these functions get a parsed namespace and
raise InvalidInput (naming the field) for anything a user can get wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
from pathlib import Path

from minidalle.cli.parsing import EXIT_INTERRUPTED, PROG, error
from minidalle.errors import InvalidInput
from minidalle.params import FINETUNE


def cmd_generate(args: argparse.Namespace) -> int:
    return _generate(args, prior=dict(prior=args.prior, prior_guidance_scale=args.prior_guidance_scale,
                                      prior_num_inference_steps=args.prior_num_inference_steps))


def cmd_vary(args: argparse.Namespace) -> int:
    """Variations of IMAGE: decoded with the same checks as a dataset's images, then as `generate` with `image`."""
    from minidalle.data import read_image

    image = read_image(args.image, field="image")
    return _generate(args, image=image)


def _generate(args: argparse.Namespace, *, prior: dict | None = None, image=None) -> int:
    for path, _ in args.adapter:  # before loading the model: fail fast
        if not path.is_dir():
            raise InvalidInput("adapter", f"{path} is not a folder")
    pipe = _load_pipeline(args.model, args.device, args.dtype)
    active = _load_adapters(pipe, args.adapter)
    kwargs = dict(num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                  height=args.height, width=args.width, num_images_per_prompt=args.num_images_per_prompt,
                  scheduler=args.scheduler, adapters=active, ip_adapter_scale=args.ip_adapter_scale, image=image,
                  **(prior or {}))
    pipe.check_inputs(args.prompt, args.negative_prompt, seed=args.seed, **kwargs)
    seed = args.seed if args.seed is not None else _random_seed()
    from tqdm.auto import tqdm

    with tqdm(total=args.num_inference_steps, desc="generate", unit="step", disable=args.quiet,
              file=sys.stderr) as bar:
        def on_step(step: int, total: int) -> None:
            bar.total = total  # second-order schedulers (heun, kdpm2) take more model calls than --steps
            bar.update(step - bar.n)

        out = pipe(args.prompt, args.negative_prompt, seed=seed, callback=on_step, **kwargs)
    from minidalle.png import save_png

    for image, meta in zip(out.images, out.metadata, strict=True):
        path = _claim_path(args.out, meta["seed"])
        try:
            save_png(image, path, meta)
        except BaseException:
            path.unlink(missing_ok=True)  # the empty placeholder
            raise
        print(path, flush=True)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    if not args.dataset_dir.is_dir():
        raise InvalidInput("dataset_dir", f"{args.dataset_dir} is not a folder")
    from minidalle.training import TrainConfig, train

    given = {name: getattr(args, name) for name, p in FINETUNE.items() if p.cli_flag}
    given.update(model=args.model, resume=args.resume, work_dir=str(args.work_dir) if args.work_dir else None)
    given = {k: v for k, v in given.items() if v is not None}  # only what the user set: the library's defaults
    config = TrainConfig(dataset_dir=str(args.dataset_dir), output_dir=str(args.out), **given)
    from tqdm.auto import tqdm

    bars: list = []  # made at the first event: dataset errors surface before any bar is drawn
    caching: list = []

    def on_progress(event: dict) -> None:
        if event.get("type") == "caching":  # the frozen encoders' outputs, once per dataset
            if not caching:
                caching.append(tqdm(total=event["total"], desc="caching", unit="item", disable=args.quiet,
                                    file=sys.stderr, leave=False))
            caching[0].update(event["done"] - caching[0].n)
            return
        if not bars:
            for bar in caching:
                bar.close()
            bars.append(tqdm(total=event.get("total", config.steps), desc="finetune", unit="step",
                             disable=args.quiet, file=sys.stderr))
        bar = bars[0]
        if event.get("type") == "progress":
            bar.total = event.get("total", bar.total)
            bar.update(event["step"] - bar.n)
            bar.set_postfix(loss=f"{event.get('loss', float('nan')):.4f}", lr=f"{event.get('lr', 0):.2e}",
                            refresh=False)
        elif event.get("type") == "checkpoint":
            bar.write(f"checkpoint at step {event['step']}: {event.get('path', '')}", file=sys.stderr)
        elif event.get("type") == "validation":
            bar.write(f"validation images at step {event['step']}: {', '.join(event.get('images', []))}",
                      file=sys.stderr)

    quiet_libraries()
    from minidalle.errors import Cancelled

    try:
        with _ctrl_c_cancels() as stop:
            def on_event(event: dict) -> None:
                on_progress(event)
                if stop.is_set():  # raised from inside the trainer's loop: it saves a checkpoint first
                    raise Cancelled()

            result = train(config, on_progress=on_event)
    except Cancelled:
        error(f"cancelled; the last checkpoint is in {config.work_dir or str(args.out) + '.work'} "
               "(run the same command again to resume)")
        return EXIT_INTERRUPTED
    finally:
        for bar in caching + bars:
            bar.close()
    print(result.adapter_dir, flush=True)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    info = collect_info()
    if args.json:
        import json

        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        text = ", ".join(value) if isinstance(value, list) else "-" if value is None else value
        print(f"{key:<{width}}  {text}")
    return 0


def collect_info() -> dict:
    quiet_libraries()
    from importlib.metadata import PackageNotFoundError, version

    import torch
    from huggingface_hub import constants

    import minidalle
    from minidalle.schedulers import scheduler_names

    def ver(dist: str) -> str | None:
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} device(s))"
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        device = "mps"
    else:
        device = "cpu"
    return {
        "minidalle": minidalle.__version__, "torch": torch.__version__, "diffusers": ver("diffusers"),
        "transformers": ver("transformers"), "peft": ver("peft"), "python": sys.version.split()[0],
        "device": device, "default_model": minidalle.default_model(), "schedulers": scheduler_names(),
        "hf_cache": str(constants.HF_HUB_CACHE), "data_dir": _data_dir(),
    }


def _data_dir() -> str | None:
    # the CLI's only setting: the data volume the service and worker use (shown, never required here)
    return os.environ.get("MINIDALLE_DATA_DIR") or None


# ----------------------------------------------------------------------------------------------------------------
# helpers
def quiet_libraries() -> None:
    """Silence transformers/diffusers notices and their weight-loading bars: the CLI owns stderr."""
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    # transformers' switch also turns off huggingface_hub's download bars: a first hub download is long work
    from huggingface_hub.utils import enable_progress_bars

    enable_progress_bars()


def _load_pipeline(model: str | None, device: str | None, dtype: str | None):
    quiet_libraries()
    from minidalle.devices import resolve_device
    from minidalle.pipeline import MiniDallePipeline

    resolve_device(device)  # before loading anything: a device this machine lacks is an error now
    if model is not None and not os.path.isdir(model) and (os.path.exists(model) or model.startswith((".", "/"))):
        raise InvalidInput("model", f"{model} is not a folder")
    return MiniDallePipeline.from_pretrained(model, torch_dtype=dtype, device=device)


def _load_adapters(pipe, adapters: list[tuple[Path, float]]) -> list[tuple[str, float]]:
    """Load each folder under a unique name derived from it; returns (name, scale) pairs for the pipeline."""
    active: list[tuple[str, float]] = []
    used: set[str] = set()
    for path, scale in adapters:
        base = re.sub(r"[^A-Za-z0-9_-]", "_", path.resolve().name).lstrip("_-")[:56] or "adapter"
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}-{n}"
        used.add(name)
        active.append((pipe.load_adapter(path, name=name), scale))
    return active


class _Flag:
    """`threading.Event`'s is_set/set without its lock: a signal handler may set it (Event.set takes a lock, and a
    second signal handled while the first handler holds it deadlocks)."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


@contextlib.contextmanager
def _ctrl_c_cancels():
    """The first Ctrl-C asks for a clean stop (checkpoint, then exit); a second one interrupts at once."""
    stop = _Flag()

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print(f"\n{PROG}: stopping at the next step (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: no signal handling, Ctrl-C behaves as usual
        yield stop
        return
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _claim_path(out_dir: Path, seed: int | None) -> Path:
    """`{counter:05d}-{seed}.png`, the next free counter; created exclusively so parallel runs never collide."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counters = [int(m.group(1)) for p in out_dir.iterdir() if (m := re.match(r"(\d+)-", p.name))]
    counter = max(counters, default=-1) + 1
    while True:
        path = out_dir / f"{counter:05d}-{seed}.png"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return path  # save_png replaces this placeholder atomically
        except FileExistsError:
            counter += 1


def _random_seed() -> int:
    import secrets

    return secrets.randbelow(2**31)

