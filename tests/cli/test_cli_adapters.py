"""`minidalle adapters import FILE --name N`: a LoRA made elsewhere published on the service's data volume, as the
service's own admin's adapter; exactly one of --out / --name; a taken name is a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

from _support.adapters import build_adapter

from jobs.keys import Principal
from jobs.volume import Volume, read_access
from minidalle import cli
from minidalle.embedded import default_model
from minidalle.lora_formats import KOHYA_FILE
from service.access import readable_adapters


def _kohya(tmp_path: Path) -> Path:
    unet = json.loads((Path(default_model()) / "unet" / "config.json").read_text())
    return build_adapter(tmp_path / "made-elsewhere", unet_config=unet) / KOHYA_FILE


def test_import_with_name_publishes_an_adapter_of_the_service(cli_run, tmp_path, monkeypatch, capsys):
    src, data = _kohya(tmp_path), tmp_path / "data"
    monkeypatch.delenv("MINIDALLE_MODEL", raising=False)
    proc = cli_run("adapters", "import", str(src), "--name", "their-style", "--data-dir", str(data))
    assert proc.returncode == 0, proc.stderr
    assert "imported kohya LoRA (rank 4, alpha 8" in proc.stdout and "adapter their-style" in proc.stdout
    vol = Volume(data)
    assert vol.adapter_exists("their-style")
    assert read_access(vol.adapter("their-style")) == {"owner": "anonymous", "visibility": "private"}
    meta = json.loads((vol.adapter("their-style") / "adapter.json").read_text())
    assert meta["base_model"] == "tiny-shapes" and meta["imported_from"] == "kohya"  # the service's name, no folder
    assert sorted(p.name for p in vol.adapters.iterdir()) == ["their-style"]  # nothing half-made left beside it
    # the service lists it: open mode's user (anonymous) and admin keys see it, as theirs
    (name, _, access), = readable_adapters(vol, Principal("anonymous", "anonymous", admin=True))
    assert name == "their-style" and access["owner"] == "anonymous"
    assert readable_adapters(vol, Principal("key_bob", "bob")) == []

    env_data = tmp_path / "env-data"  # --data-dir's default is the service's setting (here in-process: quicker)
    monkeypatch.setenv("MINIDALLE_DATA_DIR", str(env_data))
    assert _main(capsys, "adapters", "import", str(src), "--name", "their-style")[0] == 0
    assert Volume(env_data).adapter_exists("their-style")
    monkeypatch.delenv("MINIDALLE_DATA_DIR")

    rc, err = _main(capsys, "adapters", "import", str(src), "--name", "their-style", "--data-dir", str(data))
    assert rc == 2 and err.startswith("minidalle: error: name: adapter 'their-style' already exists"), err


def _main(capsys, *argv: str) -> tuple[int, str]:
    """The command line in this process; a usage error is one line on stderr."""
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:  # argparse's errors
        rc = int(e.code or 0)
    err = capsys.readouterr().err
    if rc:
        assert err.count("\n") == 1, err
    return rc, err


def test_out_or_name_exactly_one(capsys, tmp_path):
    src = _kohya(tmp_path)
    for extra in ([], ["--out", str(tmp_path / "o"), "--name", "x"], ["--out", str(tmp_path / "o"),
                                                                       "--data-dir", str(tmp_path)]):
        rc, err = _main(capsys, "adapters", "import", str(src), *extra)
        assert rc == 2 and err.startswith("minidalle: error: ") and "--" in err, err
    rc, err = _main(capsys, "adapters", "import", str(src), "--name", "bad name", "--data-dir", str(tmp_path / "d"))
    assert rc == 2 and "name: adapter name 'bad name' must be" in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()  # refused before anything was made
