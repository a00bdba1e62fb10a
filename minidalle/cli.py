"""The `minidalle` command line: generate, finetune, info, and entry points to serve / eval / train-base.

Heavy imports (torch, diffusers) happen inside the commands, so `--help` and argument errors answer at once.
Every error a user can cause is one line on stderr (`minidalle: error: …`) and exit status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

PROG = "minidalle"
EXIT_USAGE = 2  # argparse's own exit status for bad arguments; our validation errors use the same
EXIT_INTERRUPTED = 130  # the shell convention for Ctrl-C

# library field names (what a ValueError starts with) -> the flag a CLI user typed
FLAG_FOR_FIELD = {
    "negative_prompt": "--negative-prompt",
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance-scale",
    "num_images_per_prompt": "--num-images",
    "height": "--height",
    "width": "--width",
    "seed": "--seed",
    "scheduler": "--scheduler",
    "adapters": "--adapter",
    "adapter": "--adapter",
    "model": "--model",
    "torch_dtype": "--dtype",
    "device": "--device",
    "dataset_dir": "DATASET_DIR",
    "output_dir": "--out",
    "learning_rate": "--learning-rate",
    "rank": "--rank",
    "alpha": "--alpha",
    "dropout": "--dropout",
    "batch_size": "--batch-size",
    "grad_accum": "--grad-accum",
    "mixed_precision": "--mixed-precision",
    "checkpoint_every": "--checkpoint-every",
    "validation_prompts": "--validation-prompt",
    "resolution": "--resolution",
    "steps": "--steps",
}

PASSTHROUGH = {  # subcommand -> (module, function, help); the function parses its own arguments
    "serve": ("service.serve", "serve_main", "run the HTTP service (api + worker + redis) on this machine"),
    "eval": ("minidalle.evaluate", "eval_main", "evaluate a model or adapter"),
    "train-base": ("minidalle.base_training", "train_base_main", "train the embedded tiny-shapes base model"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in PASSTHROUGH:  # before argparse: their --help and flags belong to them
            return _run_passthrough(argv[0], argv[1:])
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help(sys.stderr)
            return EXIT_USAGE
        return args.func(args)
    except (ValueError, OSError) as e:  # OSError: missing files, unreadable folders, unknown hub ids
        _error(_flag_message(e))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED


# ----------------------------------------------------------------------------------------------------------------
# argument parsing
class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage text is one `--help` away)."""

    def error(self, message: str):
        _error(f"{' '.join(message.split())} (see `{self.prog} --help`)")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog=PROG, description="Text-to-image with a diffusion prior and LoRA fine-tuning.")
    ap.set_defaults(command=None)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    _add_generate(sub)
    _add_finetune(sub)
    p = sub.add_parser("info", help="versions, device, default model, where things are stored")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=cmd_info)
    for name, (_, _, help_text) in PASSTHROUGH.items():  # listed for --help; main() dispatches them before parsing
        sub.add_parser(name, help=f"{help_text} (see `{PROG} {name} --help`)", add_help=False)
    return ap


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder or hub id (default: the embedded model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, … (default: cuda when present)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="weights precision (default: fp16 on cuda, fp32 on cpu)")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate images from a prompt")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the PNGs (created)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=_int_in(1, 1000), default=25, help="denoising steps (default 25)")
    p.add_argument("--guidance-scale", type=_float_in(0, 50), default=7.5, help="classifier-free guidance (7.5)")
    p.add_argument("--seed", type=_int_in(0, 2**63 - 1), default=None,
                   help="seed of the first image; image i uses seed+i (default: random, printed)")
    p.add_argument("--num-images", type=_int_in(1, 64), default=1)
    p.add_argument("--width", type=_multiple_of_8, default=None, help="pixels, multiple of 8 (default: model's)")
    p.add_argument("--height", type=_multiple_of_8, default=None, help="pixels, multiple of 8 (default: model's)")
    p.add_argument("--scheduler", default=None, help="ddim, euler, dpmpp_2m, … (`minidalle info` lists them)")
    p.add_argument("--adapter", action="append", default=[], type=_adapter_arg, metavar="PATH[:SCALE]",
                   help="adapter folder, optionally with a scale (default 1.0); repeatable")
    _add_model_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)


def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a LoRA adapter (+ prior) on an image folder")
    p.add_argument("dataset_dir", metavar="DATASET_DIR", type=Path,
                   help="imagefolder (metadata.jsonl) or kohya-style (img.png + img.txt) folder")
    p.add_argument("--out", required=True, type=Path, metavar="ADAPTER_DIR", help="where the adapter is written")
    p.add_argument("--work-dir", type=Path, default=None, help="checkpoints and validation images "
                   "(default: ADAPTER_DIR with a .work suffix)")
    p.add_argument("--steps", type=_int_in(1, 10**7), default=None)
    p.add_argument("--learning-rate", type=_float_in(0, 1, open_low=True), default=None)
    p.add_argument("--rank", type=_int_in(1, 512), default=None)
    p.add_argument("--alpha", type=_float_in(0, 4096, open_low=True), default=None)
    p.add_argument("--dropout", type=_float_in(0, 1), default=None)
    p.add_argument("--batch-size", type=_int_in(1, 4096), default=None)
    p.add_argument("--grad-accum", type=_int_in(1, 4096), default=None)
    p.add_argument("--resolution", type=_multiple_of_8, default=None)
    p.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"], default=None,
                   help="auto: the model dtype on cuda, fp32 on cpu")
    p.add_argument("--checkpoint-every", type=_int_in(0, 10**7), default=None, help="0: only the final adapter")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="resume from the latest checkpoint in the work dir (trainer's default when omitted)")
    p.add_argument("--validation-prompt", action="append", default=None, metavar="PROMPT",
                   help="rendered with a fixed seed at each checkpoint; repeatable")
    p.add_argument("--no-train-prior", dest="train_prior", action="store_false", default=None,
                   help="train the LoRA only (the adapter then also works in stock diffusers)")
    p.add_argument("--seed", type=_int_in(0, 2**63 - 1), default=None)
    p.add_argument("--model", default=None, help="base model folder or hub id (default: the embedded model)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_finetune)


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{v} is not in [{lo}, {hi}]")
        return v
    return parse


def _float_in(lo: float, hi: float, *, open_low: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (lo < v <= hi if open_low else lo <= v <= hi):
            raise argparse.ArgumentTypeError(f"{v:g} is not in {'(' if open_low else '['}{lo:g}, {hi:g}]")
        return v
    return parse


def _multiple_of_8(text: str) -> int:
    v = _int_in(8, 16384)(text)
    if v % 8:
        raise argparse.ArgumentTypeError(f"{v} is not a multiple of 8")
    return v


def _adapter_arg(text: str) -> tuple[Path, float]:
    """`PATH` or `PATH:SCALE`; a colon followed by something that is not a number stays part of the path."""
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            path, scale = head, float(tail)
        except ValueError:
            pass
    if not -10 <= scale <= 10:
        raise argparse.ArgumentTypeError(f"scale {scale:g} of {path} is not in [-10, 10]")
    return Path(path), scale


# ----------------------------------------------------------------------------------------------------------------
# commands
def cmd_generate(args: argparse.Namespace) -> int:
    from minidalle.schedulers import check_scheduler_name

    if args.scheduler is not None:
        check_scheduler_name(args.scheduler)  # before loading the model: fail fast
    for path, _ in args.adapter:
        if not path.is_dir():
            raise ValueError(f"adapter: {path} is not a folder")
    pipe = _load_pipeline(args.model, args.device, args.dtype)
    active = _load_adapters(pipe, args.adapter)
    pipe.check_inputs(args.prompt, args.negative_prompt, num_inference_steps=args.steps,
                      guidance_scale=args.guidance_scale, height=args.height, width=args.width,
                      num_images_per_prompt=args.num_images, scheduler=args.scheduler, adapters=active,
                      seed=args.seed)
    seed = args.seed if args.seed is not None else _random_seed()
    from tqdm.auto import tqdm

    with tqdm(total=args.steps, desc="generate", unit="step", disable=args.quiet, file=sys.stderr) as bar:
        def on_step(step: int, total: int) -> None:
            bar.total = total  # second-order schedulers (heun, kdpm2) take more model calls than --steps
            bar.update(step - bar.n)

        out = pipe(args.prompt, args.negative_prompt, num_inference_steps=args.steps,
                   guidance_scale=args.guidance_scale, height=args.height, width=args.width,
                   num_images_per_prompt=args.num_images, seed=seed, scheduler=args.scheduler, adapters=active,
                   callback=on_step)
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
        raise ValueError(f"dataset_dir: {args.dataset_dir} is not a folder")
    from minidalle.trainer import TrainConfig, train

    given = {  # only what the user set: the trainer's defaults stay the single source of defaults
        "model": args.model, "steps": args.steps, "learning_rate": args.learning_rate, "rank": args.rank,
        "alpha": args.alpha, "dropout": args.dropout, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
        "resolution": args.resolution, "mixed_precision": args.mixed_precision,
        "checkpoint_every": args.checkpoint_every, "resume": args.resume, "train_prior": args.train_prior,
        "validation_prompts": args.validation_prompt, "seed": args.seed,
        "work_dir": str(args.work_dir) if args.work_dir else None,
    }
    config = TrainConfig(dataset_dir=str(args.dataset_dir), output_dir=str(args.out),
                         **{k: v for k, v in given.items() if v is not None})
    from tqdm.auto import tqdm

    bars: list = []  # made at the first event: dataset errors surface before any bar is drawn

    def on_progress(event: dict) -> None:
        if not bars:
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

    _quiet_libraries()
    from minidalle.errors import Cancelled

    try:
        with _ctrl_c_cancels() as stop:
            def on_event(event: dict) -> None:
                on_progress(event)
                if stop.is_set():  # raised from inside the trainer's loop: it saves a checkpoint first
                    raise Cancelled()

            result = train(config, on_progress=on_event)
    except Cancelled:
        _error(f"cancelled; the last checkpoint is in {config.work_dir or str(args.out) + '.work'} "
               "(run the same command again to resume)")
        return EXIT_INTERRUPTED
    finally:
        for bar in bars:
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
    _quiet_libraries()
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


def _run_passthrough(name: str, rest: list[str]) -> int:
    module_name, func_name, _ = PASSTHROUGH[name]
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):  # the module itself is missing, not one of its imports
            raise ValueError(f"{name}: not available in this installation ({module_name} is missing)") from e
        raise
    result = getattr(module, func_name)(rest)
    return int(result or 0)


# ----------------------------------------------------------------------------------------------------------------
# helpers
def _quiet_libraries() -> None:
    """Silence transformers/diffusers notices and their weight-loading bars: the CLI owns stderr."""
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def _check_device(text: str | None) -> None:
    """A device torch can parse and this machine has; else ValueError (torch would raise deep inside .to())."""
    if text is None:
        return
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise ValueError(f"device: {text!r} is not a device name (cpu, cuda, cuda:1, mps, …)") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= n:
            raise ValueError(f"device: {text} is not available (this machine has {n} CUDA device(s))")
    elif dev.type == "mps" and not (torch.backends.mps.is_available()):
        raise ValueError(f"device: {text} is not available on this machine")


def _load_pipeline(model: str | None, device: str | None, dtype: str | None):
    _quiet_libraries()
    _check_device(device)
    from minidalle.pipeline import MiniDallePipeline

    if model is not None and not os.path.isdir(model) and (os.path.exists(model) or model.startswith((".", "/"))):
        raise ValueError(f"model: {model} is not a folder")
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


@contextlib.contextmanager
def _ctrl_c_cancels():
    """The first Ctrl-C asks for a clean stop (checkpoint, then exit); a second one interrupts at once."""
    stop = threading.Event()

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


def _flag_message(e: BaseException) -> str:
    """The exception as one line, with a leading library field name shown as the CLI flag."""
    if isinstance(e, OSError) and e.filename is not None and not str(e).startswith(str(e.filename)):
        text = f"{e.strerror or e}: {e.filename}"
    else:
        text = str(e)
    text = " ".join(text.split()) or type(e).__name__
    field, sep, rest = text.partition(": ")
    if sep and field in FLAG_FOR_FIELD:
        return f"{FLAG_FOR_FIELD[field]}: {rest}"
    return text


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
