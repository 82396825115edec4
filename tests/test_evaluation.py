"""engine.evaluation through `--evaluate`: it reads only the validation split and says clearly when the
weights do not fit."""

from __future__ import annotations

import contextlib
import json
import shutil

import pytest
import torch

from conftest import run, trainer
from engine.config import parse_config
from engine.evaluation import evaluate, predict
from engine.recipe import network_card
from resnet import BlurConv2d, build_model

SMALL = ["--image-size", "32", "--crop-pct", "1.0", "--workers", "0", "--batch-size", "100", "--no-progress"]


def val_only_copy(shards, dest):
    """The digits shards without their training split: all that --evaluate may need."""
    shutil.copytree(shards, dest)
    info = json.loads((dest / "_info.json").read_text())
    for name in info["splits"].pop("train")["filenames"]:
        (dest / name).unlink()
    (dest / "_info.json").write_text(json.dumps(info))
    return dest


def test_evaluate_reads_only_the_validation_split(tmp_path, digits_shards):
    shards = val_only_copy(digits_shards, tmp_path / "val-only")
    weights = tmp_path / "model.pt"
    torch.save(build_model("resnet20", num_classes=10).state_dict(), weights)
    # no training split, and a --grad-accum no training set here could feed: neither concerns evaluation;
    # with its own resolution and flips
    proc = run(trainer("--data-dir", shards, "--arch", "resnet20", *SMALL, "--grad-accum", "1000",
                       "--val-crop", "40", "--val-resize", "44", "--eval-flip", "--evaluate", weights), timeout=180)
    assert "images=360" in proc.stdout and "Traceback" not in proc.stderr, proc.stdout + proc.stderr


def test_weights_of_another_network_are_one_line_naming_the_file(tmp_path, digits_shards):
    weights = tmp_path / "model.pt"
    torch.save(build_model("resnet20", num_classes=10).state_dict(), weights)
    proc = run(trainer("--data-dir", digits_shards, "--arch", "resnet32", *SMALL, "--evaluate", weights),
               check=False, timeout=180)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"--evaluate {weights}: its weights do not fit the network" in errors[0]
    assert "check --arch" in errors[0]


class OneProcess:
    """What evaluate() asks of an Accelerator, for one CPU process."""

    device, num_processes = torch.device("cpu"), 1

    def unwrap_model(self, model, **_):
        return model

    def autocast(self):
        return contextlib.nullcontext()

    def reduce(self, tensor, reduction):
        return tensor


class Identity:
    def __call__(self, images, labels, train=True):
        return images, labels, labels


def test_flip_averaging_is_the_mean_of_the_logits_of_each_image_and_its_mirror():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 6, 5)).eval()  # not mirror-symmetric
    images = torch.randn(7, 3, 4, 6)
    by_hand = (net(images) + net(torch.flip(images, dims=[3]))) / 2
    assert torch.allclose(predict(net, images, flip=True), by_hand)
    assert torch.equal(predict(net, images, flip=False), net(images))

    labels = by_hand.argmax(1)
    labels[:2] = (labels[:2] + 1) % 5  # two of seven wrong under the flip-averaged logits
    batches = [(images[:4], labels[:4]), (images[4:], labels[4:])]
    result = evaluate(net, batches, Identity(), OneProcess(), flip=True)
    assert result["images"] == 7, "each image counted once, not once per view"
    assert result["top1"] == pytest.approx(100 * 5 / 7)


def test_model_json_says_how_to_rebuild_a_blurpool_network_and_evaluate_takes_it(tmp_path, digits_shards,
                                                                                 monkeypatch):
    out = tmp_path / "run"
    run(trainer("--synthetic", "--arch", "resnet20", "--blurpool", "--image-size", "32", "--batch-size", "4",
                "--synthetic-steps", "2", "--epochs", "1", "--num-classes", "10", "--no-progress",
                "--output-dir", out), timeout=180)
    card = json.loads((out / "model.json").read_text())
    assert (card["arch"], card["num_classes"], card["blurpool"], card["torchvision_equivalent"]) == (
        "resnet20", 10, True, False)
    scope = {"torch": torch}
    monkeypatch.chdir(out)
    exec(card["load"], scope)  # the line a user copies
    monkeypatch.undo()
    assert any(isinstance(m, BlurConv2d) for m in scope["model"].modules())
    proc = run(trainer("--data-dir", digits_shards, "--arch", "resnet20", "--blurpool", *SMALL,
                       "--evaluate", out / "model.pt"), timeout=180)
    assert "images=360" in proc.stdout, proc.stdout + proc.stderr


def test_only_a_plain_imagenet_network_is_called_torchvision_equivalent():
    def card(*argv):
        cfg = parse_config(["--synthetic", *argv])
        return network_card(cfg.model, 1000)["torchvision_equivalent"]

    assert card("--arch", "resnet50") and not card("--arch", "resnet50", "--blurpool")
    assert not card("--arch", "resnet50", "--cifar-stem") and not card("--arch", "resnet20")


def test_the_export_writes_model_and_ema_alike_beside_and_renamed_with_plain_keys(tmp_path):
    """model_ema.pt was written in place (a crash could leave half of it) and kept the wrappers' key prefixes."""
    import torchvision
    from types import SimpleNamespace

    from timm.utils import ModelEmaV3

    from engine.evaluation import export_model

    net = build_model("resnet18", num_classes=10)
    compiled_like = torch.nn.Module()
    compiled_like._orig_mod = net  # what torch.compile's wrapper names its module
    accelerator = SimpleNamespace(is_main_process=True, unwrap_model=lambda m, **kw: m)
    export_model(accelerator, net, tmp_path, network_card(parse_config(["--synthetic", "--arch", "resnet18"]).model,
                                                          10), ema=ModelEmaV3(compiled_like, decay=0.9))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.pt", "model_ema.pt"]
    for name in ("model.pt", "model_ema.pt"):
        torchvision.models.resnet18(num_classes=10).load_state_dict(torch.load(tmp_path / name, weights_only=True))


def test_a_data_outage_mid_evaluation_is_raised_after_the_one_reduction():
    """A rank whose validation shards stay unreadable still joins the evaluation's one all-reduce (the other
    ranks wait there), then every rank raises DataOutage: the trainer checkpoints and exits 75."""
    from data.errors import DataOutage

    reduced = []

    class Counting(OneProcess):
        def reduce(self, tensor, reduction):
            reduced.append(tensor.clone())
            return tensor

    def batches():
        yield torch.randn(2, 3, 4, 6), torch.tensor([0, 1])
        raise DataOutage("data outage: shard http://h/val-000001.tar unreadable at byte 0 after 9 attempts: HTTP 503")

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 6, 5)).eval()
    with pytest.raises(DataOutage, match="val-000001.tar unreadable"):
        evaluate(net, batches(), Identity(), Counting())
    assert len(reduced) == 1 and reduced[0][2] == 2 and reduced[0][4] == 1, "counts and the outage, reduced once"


@pytest.mark.parametrize("layout, says", [
    ("run", "a run directory: evaluate its {d}/model.pt"),
    ("checkpoints", "checkpoints, not one: give one of them, e.g. {d}/step-00000012"),
    ("run-without-model", "checkpoints, not one: give one of them, e.g. {d}/checkpoints/step-00000012"),
    ("other", "no model.safetensors (it holds notes.txt)"),
])
def test_evaluate_on_a_folder_that_is_no_checkpoint_says_what_it_holds(tmp_path, layout, says):
    from engine.evaluation import load_weights

    d = tmp_path / "d"
    d.mkdir()
    steps = {"checkpoints": d, "run-without-model": d / "checkpoints", "run": d / "checkpoints"}.get(layout)
    for step in ("step-00000006", "step-00000012") if steps else ():
        (steps / step).mkdir(parents=True)
    if layout == "run":
        torch.save({}, d / "model.pt")
    if layout == "other":
        (d / "notes.txt").write_text("")
    with pytest.raises(SystemExit) as e:  # was: "no such model file"
        load_weights(str(d), build_model("resnet20", num_classes=10), "cpu")
    assert str(e.value) == (f"error: --evaluate {d}: {says.format(d=d)}; --evaluate takes a model.pt file or a "
                            "checkpoint directory (checkpoints/step-N)")


@pytest.mark.parametrize("images, unreadable, says", [
    (358, 2, "evaluated 358 of the 360 validation images the manifest lists: 2 could not be decoded (named in "
             "the warnings above)"),
    (350, 0, "the validation shards gave 350 images (350 evaluated, 0 unreadable) but their manifest lists 360: "
             "it does not match the shards; write them again with make-shards"),
    (360, 0, None),
])
def test_an_evaluation_short_of_the_manifest_says_why(capsys, images, unreadable, says):
    from types import SimpleNamespace

    from engine.evaluation import check_count

    check_count({"images": images, "unreadable": unreadable, "top1": 1.0}, SimpleNamespace(num_samples=360))
    out = capsys.readouterr().out
    assert out == (f"warning: {says}\n" if says else "")


def test_evaluate_counts_the_unreadable_images_of_its_pass():
    class Loader(list):
        bad_samples = 5  # from earlier passes: not this one's

    loader = Loader([(torch.rand(3, 3, 8, 8), torch.tensor([0, 1, 2]))])
    net = build_model("resnet20", num_classes=10, cifar_stem=True)
    result = evaluate(net, loader, Identity(), OneProcess())
    assert (result["images"], result["unreadable"]) == (3, 0)
