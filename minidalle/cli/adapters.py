"""`minidalle adapters import`: a LoRA from another tool (kohya / A1111, diffusers, peft) as an adapter folder.

    minidalle adapters import FILE_OR_DIR --out ADAPTER_DIR [--model DIR_OR_HUB_ID]

The LoRA is checked against the base model (`--model`, default the embedded one) before anything is written; the
folder it writes works with `minidalle generate --adapter`, the service (copy it under the data volume's
`adapters/`), stock diffusers (`pytorch_lora_weights.safetensors`) and A1111 / ComfyUI (`kohya_lora.safetensors`).
"""

from __future__ import annotations

from minidalle.cli.parsing import Parser


def adapters_main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="minidalle adapters", description="Bring LoRA files from other tools in as adapter folders.")
    sub = ap.add_subparsers(dest="action", metavar="ACTION", required=True)
    imp = sub.add_parser("import", help="convert a kohya / diffusers / peft LoRA into an adapter folder")
    imp.add_argument("source", metavar="FILE_OR_DIR", help="a .safetensors LoRA file, or a folder holding one")
    imp.add_argument("--out", required=True, help="the adapter folder to write (its name is the adapter's name)")
    imp.add_argument("--model", default=None, help="base model folder or hub id (default: the embedded model)")
    args = ap.parse_args(argv)
    from minidalle.cli.commands import _load_pipeline, quiet_libraries

    quiet_libraries()  # before diffusers' first import: errors stay one line
    from minidalle.lora_formats import import_adapter, read_lora

    found = read_lora(args.source)  # format errors before the model loads
    pipe = _load_pipeline(args.model, None, None)
    out = import_adapter(args.source, args.out, pipeline=pipe)
    print(f"imported {found.source} LoRA (rank {found.rank}, alpha {found.alpha:g}, {len(found.lora) // 2} modules) "
          f"-> {out}")
    return 0
