"""The `minidalle` command line: generate, finetune, info, and entry points to serve / eval / train-base.

This module parses arguments and reports errors; `minidalle.commands` does the work (and holds the heavy imports).
Every error a user can cause is one line on stderr (`minidalle: error: …`) and exit status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from minidalle import commands
from minidalle.commands import EXIT_INTERRUPTED, PROG, error

EXIT_USAGE = 2  # argparse's own exit status for bad arguments; our validation errors use the same

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
    "lr_scheduler": "--lr-scheduler",
    "lr_warmup_steps": "--lr-warmup-steps",
    "caption_dropout": "--caption-dropout",
}

PASSTHROUGH = {  # subcommand -> (module, function, help); the function parses its own arguments
    "serve": ("service.serve", "serve_main", "run the HTTP service (api + worker + redis) on this machine"),
    "eval": ("minidalle.evaluate", "eval_main", "evaluate a model or adapter"),
    "train-base": ("minidalle.base_training", "train_base_main", "train the embedded tiny-shapes base model"),
    "shapes": ("minidalle.shapes", "shapes_main", "write the procedural shapes dataset as an imagefolder"),
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
        error(_flag_message(e))
        return EXIT_USAGE
    except KeyboardInterrupt:
        error("interrupted")
        return EXIT_INTERRUPTED


# ----------------------------------------------------------------------------------------------------------------
# argument parsing
class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage text is one `--help` away)."""

    def error(self, message: str):
        error(f"{' '.join(message.split())} (see `{self.prog} --help`)")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog=PROG, description="Text-to-image with a diffusion prior and LoRA fine-tuning.")
    ap.set_defaults(command=None)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    _add_generate(sub)
    _add_finetune(sub)
    p = sub.add_parser("info", help="versions, device, default model, where things are stored")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=commands.cmd_info)
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
    p.set_defaults(func=commands.cmd_generate)


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
    p.add_argument("--lr-scheduler", choices=["constant", "cosine", "linear"], default=None,
                   help="after --lr-warmup-steps of linear warmup (default constant)")
    p.add_argument("--lr-warmup-steps", type=_int_in(0, 10**7), default=None)
    p.add_argument("--caption-dropout", type=_float_in(0, 1), default=None,
                   help="train on the empty caption this often, for classifier-free guidance (default 0.05)")
    p.add_argument("--random-flip", action="store_true", default=None, help="mirror images at random")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="less activation memory on big UNets, ~30%% slower")
    p.add_argument("--seed", type=_int_in(0, 2**63 - 1), default=None)
    p.add_argument("--model", default=None, help="base model folder or hub id (default: the embedded model)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=commands.cmd_finetune)


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


if __name__ == "__main__":
    raise SystemExit(main())
