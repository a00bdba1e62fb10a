"""`minidalle adapters import`: a LoRA from another tool (kohya / A1111, diffusers, peft) as an adapter folder.

    minidalle adapters import FILE_OR_DIR --out ADAPTER_DIR [--model DIR_OR_HUB_ID]
    minidalle adapters import FILE_OR_DIR --name NAME [--data-dir DIR] [--model DIR_OR_HUB_ID]

The LoRA is checked against the base model (`--model`, default the embedded one; with `--name` the service's,
MINIDALLE_MODEL) before anything is written; the folder it writes works with `minidalle generate --adapter`, stock
diffusers (`pytorch_lora_weights.safetensors`) and A1111 / ComfyUI (`kohya_lora.safetensors`). With `--name` it is
published on the service's data volume (`--data-dir`, default MINIDALLE_DATA_DIR, else `data`) as adapter NAME,
owned by the service's built-in admin (`anonymous`, the user of open mode; admin keys see it too), as
`POST /adapters` would publish it.
"""

from __future__ import annotations

import os
import shutil
import uuid

from minidalle.cli.parsing import Parser


def adapters_main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="minidalle adapters", description="Bring LoRA files from other tools in as adapter folders.")
    sub = ap.add_subparsers(dest="action", metavar="ACTION", required=True)
    imp = sub.add_parser("import", help="convert a kohya / diffusers / peft LoRA into an adapter folder")
    imp.add_argument("source", metavar="FILE_OR_DIR", help="a .safetensors LoRA file, or a folder holding one")
    imp.add_argument("--out", default=None, help="the adapter folder to write (its name is the adapter's name)")
    imp.add_argument("--name", default=None, help="publish it on the service's data volume as adapter NAME")
    imp.add_argument("--data-dir", default=None, help="with --name: the service's data volume (default: "
                     "MINIDALLE_DATA_DIR, else data)")
    imp.add_argument("--model", default=None, help="base model folder or hub id (default: the embedded model; "
                     "with --name the service's, MINIDALLE_MODEL)")
    args = ap.parse_args(argv)
    if (args.out is None) == (args.name is None):
        ap.error("give exactly one of --out ADAPTER_DIR (a folder) or --name NAME (an adapter of the service)")
    if args.data_dir is not None and args.name is None:
        ap.error("--data-dir goes with --name")
    from minidalle.cli.commands import _load_pipeline, quiet_libraries

    quiet_libraries()  # before diffusers' first import: errors stay one line
    from minidalle.lora_formats import import_adapter, read_lora

    if args.name is not None:
        return _publish(args)
    found = read_lora(args.source)  # format errors before the model loads
    pipe = _load_pipeline(args.model, None, None)
    out = import_adapter(args.source, args.out, pipeline=pipe)
    print(f"imported {_what(found)} -> {out}")
    return 0


def _what(found) -> str:
    return f"{found.source} LoRA (rank {found.rank}, alpha {found.alpha:g}, {len(found.lora) // 2} modules)"


def _publish(args) -> int:
    """Import into a hidden folder of the volume's adapters/, then rename it into adapters/{name} with its owner."""
    from jobs.keys import ANONYMOUS_ID
    from jobs.settings import CommonSettings
    from jobs.volume import Volume, write_access
    from minidalle.cli.commands import _load_pipeline
    from minidalle.errors import InvalidInput
    from minidalle.lora_formats import import_adapter, read_lora
    from minidalle.params import check_adapter_name

    overrides = {k: v for k, v in (("data_dir", args.data_dir), ("model", args.model)) if v is not None}
    settings = CommonSettings(**overrides)  # the service's own settings (environment, .env), these flags on top
    vol = Volume(settings.data_dir)
    name = check_adapter_name(args.name)
    if vol.adapter_taken(name):
        raise InvalidInput("name", f"adapter {name!r} already exists in {vol.adapters}")
    found = read_lora(args.source)  # format errors before the model loads
    pipe = _load_pipeline(settings.model or None, None, None)
    pipe.model_id = settings.model_name  # what the service calls its model (adapter.json keeps no folder)
    vol.adapters.mkdir(parents=True, exist_ok=True)
    tmp = vol.adapters / f".incoming-{name}-{uuid.uuid4().hex[:8]}"  # hidden: not listed, not an adapter name
    try:
        import_adapter(args.source, tmp, pipeline=pipe, name=name)
        write_access(tmp, owner=ANONYMOUS_ID, visibility="private")
        if vol.adapter_taken(name):  # published meanwhile (a fine-tune, an upload)
            raise InvalidInput("name", f"adapter {name!r} already exists in {vol.adapters}")
        os.rename(tmp, vol.adapter(name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"imported {_what(found)} -> adapter {name} in {vol.adapters}")
    return 0
