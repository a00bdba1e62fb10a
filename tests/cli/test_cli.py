"""The `minidalle` command line, run as users run it: subprocesses for the entry point, main() for the rest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tomllib
from PIL import Image

from minidalle import cli
from minidalle.png import read_parameters
from minidalle.training.checkpoint import latest_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]
from minidalle.embedded import TINY_RANDOM  # noqa: E402  (CLI tests run on the random tiny model)

GEN = ["--steps", "3", "--guidance-scale", "6", "--quiet", "--model", str(TINY_RANDOM)]


def _one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("minidalle: error: "), stderr
    return lines[0]


def _run_main(capsys, *argv: str) -> tuple[int, list[str], str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err


def test_generate_subprocess_writes_pngs_and_same_seed_same_bytes(cli_run, tmp_path, capsys):
    proc = cli_run("generate", "a red circle", "--out", str(tmp_path / "a"), "--seed", "42", "--num-images", "2",
               "--steps", "3", "--guidance-scale", "6", "--scheduler", "euler_ancestral")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "generate" in proc.stderr  # the progress bar, on stderr
    paths = proc.stdout.split()
    assert [p.rsplit("/", 1)[1] for p in paths] == ["00000-42.png", "00001-43.png"]
    for path, seed in zip(paths, (42, 43), strict=True):
        meta = read_parameters(path)
        assert (meta["seed"], meta["prompt"], meta["steps"], meta["scheduler"]) == (seed, "a red circle", 3,
                                                                                   "euler_ancestral")
        with Image.open(path) as im:
            assert f"Seed: {seed}" in im.text["parameters"] and im.text["parameters"].startswith("a red circle\n")
    # the same request in this process (main(), not a subprocess): byte-identical files
    rc, again, _ = _run_main(capsys, "generate", "a red circle", "--out", str(tmp_path / "b"), "--seed", "42",
                             "--num-images", "2", "--steps", "3", "--guidance-scale", "6", "--scheduler",
                             "euler_ancestral", "--quiet")
    assert rc == 0
    assert [open(p, "rb").read() for p in paths] == [open(p, "rb").read() for p in again]


def test_runs_into_the_same_folder_do_not_overwrite(tmp_path, capsys):
    out = tmp_path / "imgs"
    rc1, first, _ = _run_main(capsys, "generate", "a cat", "--out", str(out), "--seed", "7", *GEN)
    rc2, second, _ = _run_main(capsys, "generate", "a dog", "--out", str(out), "--seed", "7", *GEN)
    assert rc1 == rc2 == 0
    assert first != second
    assert sorted(p.name for p in out.iterdir()) == ["00000-7.png", "00001-7.png"]
    assert read_parameters(second[0])["prompt"] == "a dog" and read_parameters(first[0])["prompt"] == "a cat"


def test_unseeded_generate_prints_a_reproducible_seed(tmp_path, capsys):
    rc, paths, _ = _run_main(capsys, "generate", "a star", "--out", str(tmp_path / "a"), *GEN)
    assert rc == 0
    seed = read_parameters(paths[0])["seed"]
    assert paths[0].endswith(f"-{seed}.png")
    rc, again, _ = _run_main(capsys, "generate", "a star", "--out", str(tmp_path / "b"), "--seed", str(seed), *GEN)
    assert open(paths[0], "rb").read() == open(again[0], "rb").read()


def test_generate_with_adapters_and_scales(make_adapter, tmp_path, capsys):
    a, b = make_adapter("style-a", seed=1), make_adapter("style.b", seed=2)  # a dot is not valid in a name
    rc, plain, _ = _run_main(capsys, "generate", "a tree", "--out", str(tmp_path / "p"), "--seed", "3", *GEN)
    rc2, styled, err = _run_main(capsys, "generate", "a tree", "--out", str(tmp_path / "s"), "--seed", "3", *GEN,
                                 "--adapter", f"{a}:0.8", "--adapter", str(b))
    assert rc == rc2 == 0, err
    meta = read_parameters(styled[0])
    assert meta["adapters"] == [["style-a", 0.8], ["style_b", 1.0]]
    assert not np.array_equal(np.asarray(Image.open(plain[0])), np.asarray(Image.open(styled[0])))


@pytest.mark.parametrize("argv, expected", [
    (["generate", "x", "--out", "{tmp}", "--steps", "0"], "--steps"),
    (["generate", "x", "--out", "{tmp}", "--width", "30"], "multiple of 8"),
    (["generate", "x", "--out", "{tmp}", "--guidance-scale", "lots"], "--guidance-scale"),
    (["generate", "x"], "--out"),
    (["generate", "x", "--out", "{tmp}", "--adapter", "a:99"], "scale"),
    (["generate", "x", "--out", "{tmp}", "--scheduler", "nope"], "--scheduler: unknown scheduler 'nope'"),
    (["generate", "x", "--out", "{tmp}", "--adapter", "{tmp}/missing:0.5"], "--adapter"),
    (["generate", "x", "--out", "{tmp}", "--model", "{tmp}/no-model"], "--model"),
    (["generate", "x", "--out", "{tmp}", "--device", "toaster"], "--device: 'toaster' is not a device name"),
    (["generate", "x", "--out", "{tmp}", "--device", "cuda:99"], "--device: cuda:99 is not available"),
    (["generate", "red " * 100, "--out", "{tmp}"], "prompt: 100 tokens"),
    (["generate", "x", "--out", "{tmp}", "--negative-prompt", "red " * 90], "--negative-prompt: 90 tokens"),
    (["finetune", "{tmp}/no-data", "--out", "{tmp}/a"], "DATASET_DIR"),
    (["finetune", "{tmp}", "--out", "{tmp}/a", "--rank", "0"], "--rank"),
    (["frobnicate"], "invalid choice"),
    ([], None),
])
def test_bad_arguments_give_one_line_and_exit_2(tmp_path, capsys, argv, expected):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own exit
        rc = e.code
    out, err = capsys.readouterr()
    assert rc == 2
    if expected is None:  # no command: the help, on stderr
        assert "generate" in err and "finetune" in err and out == ""
        return
    assert expected in _one_line_error(err)
    assert out == "" and not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("argv, expected", [
    (["generate", "x", "--out", "{tmp}", "--steps", "0"], "--steps"),
    (["generate", "red " * 100, "--out", "{tmp}", "--steps", "2"], "prompt: 100 tokens"),  # after model load
])
def test_bad_arguments_in_a_subprocess_no_traceback(cli_run, tmp_path, argv, expected):
    proc = cli_run(*[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert expected in _one_line_error(proc.stderr)
    assert proc.stdout == ""


def test_info(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MINIDALLE_DATA_DIR", str(tmp_path))
    rc, lines, _ = _run_main(capsys, "info", "--json")
    assert rc == 0
    info = json.loads("\n".join(lines))
    import diffusers
    import peft
    import torch
    import transformers

    import minidalle

    assert info["minidalle"] == minidalle.__version__ and info["torch"] == torch.__version__
    assert (info["diffusers"], info["transformers"], info["peft"]) == (diffusers.__version__,
                                                                      transformers.__version__, peft.__version__)
    assert info["device"] == ("cpu" if not torch.cuda.is_available() else info["device"])
    assert info["default_model"] == minidalle.default_model()
    assert {"ddim", "ddpm", "pndm", "euler", "euler_ancestral", "dpmpp_2m"} <= set(info["schedulers"])
    assert info["data_dir"] == str(tmp_path) and info["hf_cache"]
    rc, text, _ = _run_main(capsys, "info")
    assert rc == 0 and any(line.startswith("default_model") and info["default_model"] in line for line in text)


def test_passthrough_commands_get_their_arguments(monkeypatch):
    seen = {}

    def fake(name):
        def run(argv):
            seen[name] = argv
            return 3
        return run

    import minidalle.cli.tiny

    monkeypatch.setattr(minidalle.cli.tiny, "eval_main", fake("eval"))
    monkeypatch.setattr(minidalle.cli.tiny, "train_base_main", fake("train-base"))
    assert cli.main(["eval", "--model", "m", "--help"]) == 3
    assert cli.main(["train-base", "--steps", "5"]) == 3
    assert seen == {"eval": ["--model", "m", "--help"], "train-base": ["--steps", "5"]}


def test_console_script_is_declared():
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["minidalle"] == "minidalle.cli:main"
    assert callable(cli.main)


@pytest.fixture
def dataset(zorb):
    return zorb(3)


def test_finetune_then_generate_with_the_adapter(dataset, tmp_path, capsys):
    out = tmp_path / "adapters" / "zorb"
    rc, lines, err = _run_main(capsys, "finetune", str(dataset), "--out", str(out), "--steps", "2",
                               "--checkpoint-every", "1", "--learning-rate", "1e-3", "--rank", "4", "--alpha", "4",
                               "--validation-prompt", "a zorb", "--seed", "1", "--model", str(TINY_RANDOM))
    assert rc == 0, err
    assert lines == [str(out)]
    assert "finetune" in err and "loss" in err and "checkpoint at step 1" in err  # bar with loss, checkpoints
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["lora"]["rank"] == 4 and meta["lora"]["alpha"] == 4 and meta["has_prior"] is True
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    rc, paths, err = _run_main(capsys, "generate", "a zorb", "--out", str(tmp_path / "img"), "--seed", "1", *GEN,
                               "--adapter", f"{out}:0.5")
    assert rc == 0, err
    assert read_parameters(paths[0])["adapters"] == [["zorb", 0.5]]


def test_finetune_no_train_prior(dataset, tmp_path, capsys):
    out = tmp_path / "loraonly"
    rc, _, err = _run_main(capsys, "finetune", str(dataset), "--out", str(out), "--steps", "1", "--no-train-prior",
                           "--checkpoint-every", "0", "--model", str(TINY_RANDOM))
    assert rc == 0, err
    assert json.loads((out / "adapter.json").read_text())["has_prior"] is False


def test_finetune_broken_image_names_the_file(dataset, tmp_path, capsys):
    (dataset / "img1.png").write_bytes(b"not a png at all")
    rc, out, err = _run_main(capsys, "finetune", str(dataset), "--out", str(tmp_path / "a"), "--steps", "1",
                             "--model", str(TINY_RANDOM))
    assert rc == 2 and out == []
    assert "img1.png" in _one_line_error(err)
    assert not (tmp_path / "a").exists()


def test_ctrl_c_during_finetune_checkpoints_and_a_rerun_resumes(dataset, tmp_path, capsys, monkeypatch):
    import signal

    import minidalle.training as trainer

    real_train, steps_seen = trainer.train, []

    def train_with_ctrl_c_at_step_2(config, on_progress=None, pipeline=None):
        def forward(event):
            if event["type"] == "progress":
                steps_seen.append(event["step"])
                if event["step"] == 2 and len(steps_seen) == 2:
                    signal.raise_signal(signal.SIGINT)  # what the terminal sends on Ctrl-C
            on_progress(event)
        return real_train(config, on_progress=forward, pipeline=pipeline)

    monkeypatch.setattr(trainer, "train", train_with_ctrl_c_at_step_2)
    out = tmp_path / "a"
    argv = ["finetune", str(dataset), "--out", str(out), "--steps", "4", "--checkpoint-every", "0", "--quiet"]
    rc, lines, err = _run_main(capsys, *argv)
    assert rc == 130 and lines == []
    assert "cancelled" in err and not out.exists()
    assert latest_checkpoint(tmp_path / "a.work").name.endswith("2")  # saved on the way out
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    rc, lines, err = _run_main(capsys, *argv)  # the same command again: resumes at step 3
    assert rc == 0, err
    assert steps_seen == [1, 2, 3, 4] and lines == [str(out)]


def test_keys_create_list_revoke(client, capsys):
    """`minidalle keys` against a real redis-server: the key is printed once, only its hash is stored."""
    from jobs.keys import KEY_PREFIX, KeyStore

    url = "redis://{host}:{port}/{db}".format(**client.connection_pool.connection_kwargs)
    client.flushdb()
    rc, lines, err = _run_main(capsys, "keys", "--redis-url", url, "create", "alice", "--concurrent-jobs", "3")
    assert rc == 0, err
    token = lines[0].split()[-1]
    assert token.startswith("md_") and lines[2].split()[-1].startswith("whsec_")
    stored = "\n".join(str(client.hgetall(k)) for k in client.scan_iter(KEY_PREFIX + "*"))
    assert token not in stored  # only its hash
    principal = KeyStore(client).authenticate(token)
    assert principal.name == "alice" and principal.limits.concurrent_jobs == 3 and not principal.admin
    rc, lines, _ = _run_main(capsys, "keys", "--redis-url", url, "list")
    assert rc == 0 and "alice" in lines[0] and token not in "\n".join(lines)
    rc, lines, _ = _run_main(capsys, "keys", "--redis-url", url, "revoke", "alice")
    assert rc == 0 and lines[0].startswith("revoked key_")
    assert KeyStore(client).authenticate(token) is None
    rc, _, err = _run_main(capsys, "keys", "--redis-url", url, "revoke", "nobody")
    assert rc == 2 and _one_line_error(err).startswith("minidalle: error: key: no key")
