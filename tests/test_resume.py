"""engine/resume.py: a checkpoint that does not fit this run is refused with one line naming both sides, and
nothing is renamed, so the right flags then continue it; what else changed is said in one warning."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import run
from engine import checkpoints as C

SYNTHETIC = ["--synthetic", "--image-size", "32", "--batch-size", "4", "--synthetic-steps", "3", "--epochs", "2",
             "--no-progress", "--log-every", "1", "--checkpoint-every", "2"]

# Several trainer runs in one interpreter (each a fresh main()), to spare the imports of a process per run.
RUNNER = """
import json, sys
import train_imagenet
for argv in json.loads(sys.argv[1]):
    print("=== run", flush=True)
    try:
        code = train_imagenet.main(argv)
    except SystemExit as e:
        code = e.code
        if isinstance(code, str):
            print(code, flush=True)
            code = 1
    print(f"=== exit {code}", flush=True)
"""


def runs(*argvs: list) -> list[tuple[int, str]]:
    proc = run([sys.executable, "-c", RUNNER, json.dumps([list(map(str, a)) for a in argvs])], timeout=600)
    parts = proc.stdout.split("=== run\n")[1:]
    out = []
    for part in parts:
        text, _, code = part.rpartition("=== exit ")
        out.append((int(code.strip()), text))
    assert len(out) == len(argvs), proc.stdout + proc.stderr
    return out


def names(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def unseal(ckpt, name: str) -> None:
    """Remove a file and its checksum, as a checkpoint written before it held that file."""
    (ckpt / name).unlink()
    sums = json.loads((ckpt / C.CHECKSUM_FILE).read_text())
    del sums[name]
    (ckpt / C.CHECKSUM_FILE).write_text(json.dumps(sums))


@pytest.mark.slow
def test_a_checkpoint_of_another_network_or_optimizer_is_refused_and_the_right_flags_continue_it(tmp_path):
    """Also for a checkpoint from before checkpoints held their configuration: there the misfit shows when the
    weights do not load, and is told apart from damage in the same way."""
    out, old = tmp_path / "run", tmp_path / "old"
    base = [*SYNTHETIC, "--arch", "resnet20", "--num-classes", "10", "--output-dir", out]
    made = runs([*base, "--max-steps", "4"], [*SYNTHETIC, "--arch", "resnet20", "--num-classes", "10",
                                              "--output-dir", old, "--max-steps", "2"])
    assert [code for code, _ in made] == [0, 0] and names(out) == ["step-00000002", "step-00000003", "step-00000004"]
    unseal(old / "checkpoints" / "step-00000002", "config.yaml")
    (old / "config.yaml").unlink()
    ckpt = out / "checkpoints" / "step-00000004"
    asked = {"--arch resnet32": ["--arch", "resnet32"], "--opt adamw": ["--opt", "adamw"],
             "12 classes": ["--num-classes", "12"], "--blurpool": ["--blurpool"]}
    results = runs(*[[*base, *flags, "--resume", "auto"] for flags in asked.values()],
                   [*SYNTHETIC, "--arch", "resnet32", "--num-classes", "10", "--output-dir", old, "--resume", "auto"])
    was = {"--arch resnet32": "--arch resnet20", "--opt adamw": "--opt sgd", "12 classes": "10 classes",
           "--blurpool": "--no-blurpool"}
    for (code, text), what in zip(results, asked):
        errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
        assert code == 1 and errors == [
            f"error: checkpoint {ckpt} was written with {was[what]} (its config.yaml); this run asks for {what}, "
            f"which cannot continue it. Run again with {was[what]} to continue it, or give a new --output-dir to "
            "start another run; nothing was changed"], text
    code, text = results[-1]
    assert code == 1 and "does not fit this run's network or optimizer (" in text and "nothing was changed" in text
    assert names(out) == ["step-00000002", "step-00000003", "step-00000004"] and names(old) == ["step-00000002"]
    (code, text), = runs([*base, "--resume", "auto", "--ema-decay", "0.9", "--lr", "0.2"])
    assert code == 0, text
    assert "step-00000004 holds no EMA (written without --ema-decay): the EMA starts from its weights" in text
    assert ("warning: this run's settings differ from those step-00000004 was written with: --ema-decay 0.0 -> 0.9, "
            "--lr 0.1 -> 0.2; the run goes on with this run's") in text
    assert (out / "model_ema.pt").exists() and "model written to" in text


def test_only_the_main_process_hashes_a_checkpoint_and_every_rank_gets_its_verdict(tmp_path, monkeypatch):
    """Every rank hashed every file (the checkpoint read N times over, N^2 RNG files at N ranks)."""
    from types import SimpleNamespace

    import torch

    from engine import resume

    hashed = []

    def verify(ckpt):
        hashed.append(ckpt)
        raise ValueError("model.safetensors is missing or not the file that was written (checksum mismatch)")

    monkeypatch.setattr(resume, "verify_checksums", verify)
    rank = {r: SimpleNamespace(is_main_process=r == 0, num_processes=1, device=torch.device("cpu")) for r in (0, 1)}
    assert resume.verified(rank[1], tmp_path) is None and hashed == [], "rank 1 reads nothing (its verdict: rank 0's)"
    assert "checksum mismatch" in resume.verified(rank[0], tmp_path) and hashed == [tmp_path]
