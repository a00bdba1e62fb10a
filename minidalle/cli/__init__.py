"""The `minidalle` command line: generate, finetune, info, serve, and the tiny-shapes rig's commands.

This module parses arguments and reports errors; `minidalle.cli.commands` does the work (and holds the heavy
imports). The generate and finetune flags are derived from `minidalle.params`, so their bounds, defaults and help
are the library's. Every error a user can cause is one line on stderr (`minidalle: error: …`) and exit status 2;
never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from minidalle.cli.parsing import EXIT_USAGE, PROG, Parser, add_param, flags_of, run_main
from minidalle.errors import InvalidInput
from minidalle.params import DTYPES, FINETUNE, GENERATE

# library field names (an InvalidInput's `field`) -> the flag a CLI user typed
FLAG_FOR_FIELD = {
    **flags_of(GENERATE), **flags_of(FINETUNE),
    "negative_prompt": "--negative-prompt", "adapters": "--adapter", "adapter": "--adapter", "model": "--model",
    "torch_dtype": "--dtype", "device": "--device", "dataset_dir": "DATASET_DIR", "output_dir": "--out",
    "file": "FILE_OR_DIR", "image": "IMAGE",
}

SUBCOMMANDS = {  # subcommand -> (module, function, help); the function parses its own arguments
    "serve": ("service.serve", "serve_main", "run the HTTP service (api + worker + redis) on this machine"),
    "keys": ("minidalle.cli.keys", "keys_main", "create, list and revoke the service's API keys"),
    "adapters": ("minidalle.cli.adapters", "adapters_main", "import LoRA files from kohya / A1111, diffusers, peft"),
    "eval": ("minidalle.cli.tiny", "eval_main", "evaluate a model or adapter on held-out shapes prompts"),
    "train-base": ("minidalle.cli.tiny", "train_base_main", "train the embedded tiny-shapes base model"),
    "shapes": ("minidalle.cli.tiny", "shapes_main", "write the procedural shapes dataset as an imagefolder"),
    "build-tiny": ("minidalle.cli.tiny", "build_tiny_main", "rebuild the random-weight embedded test model"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:  # before argparse: their --help and flags belong to them
        return run_main(_subcommand(argv[0]), argv[1:], FLAG_FOR_FIELD)
    return run_main(_main, argv, FLAG_FOR_FIELD)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help(sys.stderr)
        return EXIT_USAGE
    return args.func(args)


def _subcommand(name: str):
    module_name, func_name, _ = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):  # the module itself is missing, not one of its imports
            raise InvalidInput(name, f"not available in this installation ({module_name} is missing)") from e
        raise
    return getattr(module, func_name)


# ----------------------------------------------------------------------------------------------------------------
# argument parsing
def build_parser() -> argparse.ArgumentParser:
    from minidalle.cli import commands

    ap = Parser(prog=PROG, description="Text-to-image with a diffusion prior and LoRA fine-tuning.")
    ap.set_defaults(command=None)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    _add_generate(sub, commands.cmd_generate)
    _add_generate(sub, commands.cmd_vary, vary=True)
    _add_finetune(sub, commands.cmd_finetune)
    p = sub.add_parser("info", help="versions, device, default model, where things are stored")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=commands.cmd_info)
    for name, (_, _, help_text) in SUBCOMMANDS.items():  # listed for --help; main() dispatches them before parsing
        sub.add_parser(name, help=f"{help_text} (see `{PROG} {name} --help`)", add_help=False)
    return ap


def _add_model_args(p: argparse.ArgumentParser, *, dtype: bool = True) -> None:
    p.add_argument("--model", default=None, help="model folder or hub id (default: the embedded model)")
    if dtype:
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, … (default: cuda when present)")
        p.add_argument("--dtype", choices=list(DTYPES), default=None,
                       help="weights precision (default: fp16 on cuda, fp32 on cpu)")


def _add_generate(sub, func, *, vary: bool = False) -> None:
    if vary:
        p = sub.add_parser("vary", help="variations of an image (its CLIP image embedding conditions the UNet)")
        p.add_argument("image", metavar="IMAGE", type=Path, help="PNG, JPEG, WEBP or BMP file")
        p.add_argument("--prompt", default="", help="optional text to steer the variations")
    else:
        p = sub.add_parser("generate", help="generate images from a prompt")
        p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the PNGs (created)")
    p.add_argument("--negative-prompt", default=None)
    for param in GENERATE.values():
        if param.cli_flag and not (vary and param.name.startswith("prior")):  # a variation's embedding is its image's
            add_param(p, param, default=param.default)
    p.add_argument("--adapter", action="append", default=[], type=_adapter_arg, metavar="PATH[:SCALE]",
                   help="adapter folder, optionally with a scale (default 1.0); repeatable")
    _add_model_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=func)


def _add_finetune(sub, func) -> None:
    p = sub.add_parser("finetune", help="fine-tune a LoRA adapter (+ prior) on an image folder")
    p.add_argument("dataset_dir", metavar="DATASET_DIR", type=Path,
                   help="imagefolder (metadata.jsonl) or kohya-style (img.png + img.txt) folder")
    p.add_argument("--out", required=True, type=Path, metavar="ADAPTER_DIR", help="where the adapter is written")
    p.add_argument("--work-dir", type=Path, default=None, help="checkpoints and validation images "
                   "(default: ADAPTER_DIR with a .work suffix)")
    for param in FINETUNE.values():  # default None: "not given", so the library's default applies
        if param.cli_flag:
            add_param(p, param)
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="resume from the latest checkpoint in the work dir (the default)")
    _add_model_args(p, dtype=False)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=func)


def _adapter_arg(text: str) -> tuple[Path, float]:
    """`PATH` or `PATH:SCALE`; a colon followed by something that is not a number stays part of the path."""
    from minidalle.params import Generate

    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            path, scale = head, float(tail)
        except ValueError:
            pass
    if not Generate.adapter_scale.ge <= scale <= Generate.adapter_scale.le:
        raise argparse.ArgumentTypeError(f"scale {scale:g} of {path} is not {Generate.adapter_scale.bounds()}")
    return Path(path), scale

