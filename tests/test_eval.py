"""cass-eval on a synthetic VOC-layout folder: reference scores, resuming, the CLI, torchrun with gloo, full size."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import torch
from PIL import Image

from cass_plugins.cli.evaluate import main
from cass_plugins.evaluation.runner import evaluate
from cass_plugins.evaluation.tables import format_paper_table
from cass_plugins.pipeline.segmenter import Segmenter
from cass_plugins.pipeline.vocabulary import Vocabulary
from conftest import make_tiny_clip, make_tiny_vfm

REPO = Path(__file__).resolve().parents[1]
# (H, W) of the synthetic images: portrait, landscape and square, all tiny.
SIZES = [(32, 40), (40, 32), (36, 36), (28, 48), (44, 30)]
NAMES = [f"2007_{i:06d}" for i in range(len(SIZES))]
# Tiny models and tiny images: a 64-pixel short side keeps every image to a few milliseconds.
FAST = {"short_side": 64}


def make_voc(data: Path) -> Path:
    """VOCdevkit/VOC2012 with JPEGImages, palette SegmentationClass PNGs (0..20, 255 borders) and val.txt."""
    root = data / "VOCdevkit" / "VOC2012"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (h, w) in zip(NAMES, SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        # 4×4 blocks of classes (a few classes per image, so some are absent from the whole set) + ignore border.
        blocks = rng.choice([0, 3, 7, 12, 15], size=(4, 4)).astype(np.uint8)
        label = np.kron(blocks, np.ones((h // 4 + 1, w // 4 + 1), dtype=np.uint8))[:h, :w]
        label[0, :] = 255
        img = Image.fromarray(label)
        img.putpalette([(37 * i) % 256 for i in range(256 * 3)])  # indices are read, never colours
        img.save(root / "SegmentationClass" / f"{name}.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(NAMES) + "\n")
    return root


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> int:
    """Run the module with one intra-op thread; yields the previous thread count."""
    # Tiny models gain nothing from intra-op threads, and on a busy machine spinning OpenMP threads cost seconds;
    # one thread also matches the torchrun workers of the distributed test (same float reduction order).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield threads
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("data")
    make_voc(data)
    return data


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    # Shared by the module's tests so the text classifier is encoded once (cached per model).
    return make_tiny_clip(), make_tiny_vfm()


@pytest.fixture
def count_segment(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the image of every Segmenter.segment call."""
    calls: list[str] = []
    original = Segmenter.segment

    def counting(self: Segmenter, image, vocabulary=None):
        calls.append(Path(image).stem)
        return original(self, image, vocabulary)

    monkeypatch.setattr(Segmenter, "segment", counting)
    return calls


def _reference_scores(models, voc: Path, n: int) -> dict:
    """mIoU / aAcc / per-class IoU from a confusion matrix, reading the labels with PIL directly."""
    clip, vfm = models
    root = voc / "VOCdevkit" / "VOC2012"
    conf = np.zeros((21, 21), dtype=np.int64)
    vocab = Vocabulary.builtin("voc21")
    with Segmenter(clip, vfm, dataset="voc21", **FAST) as seg:
        for name in NAMES[:n]:
            pred = seg.segment(root / "JPEGImages" / f"{name}.jpg", vocab).labels.numpy()
            gt = np.array(Image.open(root / "SegmentationClass" / f"{name}.png")).astype(np.int64)
            keep = gt != 255
            conf += np.bincount(21 * gt[keep] + pred[keep], minlength=21 * 21).reshape(21, 21)
    inter = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - inter
    with np.errstate(invalid="ignore"):
        iou = inter / union
    return {
        "mIoU": round(100 * float(np.nanmean(iou)), 2),
        "aAcc": round(100 * inter.sum() / conf.sum(), 2),
        "IoU": [None if np.isnan(v) else round(100 * v, 2) for v in iou],
    }


# ---------------------------------------------------------------------------------------------------------------


def test_scores_match_independent_confusion_matrix(models, voc: Path) -> None:
    section = evaluate(models, "voc21", voc, limit=4, overrides=FAST, progress=False)
    ref = _reference_scores(models, voc, 4)
    assert section["num_images"] == 4 and section["num_images_total"] == 5 and not section["complete"]
    assert section["mIoU"] == pytest.approx(ref["mIoU"], abs=1e-9)
    assert section["aAcc"] == pytest.approx(ref["aAcc"], abs=1e-9)
    got = list(section["IoU"].values())
    assert [g is None for g in got] == [r is None for r in ref["IoU"]]
    assert [g for g in got if g is not None] == pytest.approx([r for r in ref["IoU"] if r is not None], abs=1e-9)
    assert list(section["IoU"])[:2] == ["background", "aeroplane"]
    assert section["scored"] == NAMES[:4]
    assert section["config"]["pipeline"]["dataset"] == "voc21" and section["config"]["pipeline"]["short_side"] == 64


def test_resume_scores_only_new_images_and_equals_one_run(models, voc: Path, tmp_path: Path, count_segment) -> None:
    out = tmp_path / "resumed.json"
    evaluate(models, "voc21", voc, limit=2, out=out, overrides=FAST, progress=False)
    assert count_segment == NAMES[:2]
    evaluate(models, "voc21", voc, limit=4, out=out, overrides=FAST, progress=False)
    assert count_segment == NAMES[:4]  # only the two new images were segmented
    evaluate(models, "voc21", voc, limit=4, out=out, overrides=FAST, progress=False)
    assert len(count_segment) == 4  # nothing left to do

    once = tmp_path / "once.json"
    evaluate(models, "voc21", voc, limit=4, out=once, overrides=FAST, progress=False)
    assert json.loads(out.read_text()) == json.loads(once.read_text())

    # Another configuration must not be mixed into the stored result ...
    with pytest.raises(ValueError, match="different config.*gamma"):
        evaluate(models, "voc21", voc, limit=4, out=out, overrides={**FAST, "gamma": 0.5}, progress=False)
    # ... unless the stored result is discarded.
    section = evaluate(models, "voc21", voc, limit=1, out=out, overrides={**FAST, "gamma": 0.5}, progress=False,
                       restart=True)
    assert section["scored"] == NAMES[:1] and section["config"]["ops"]["gamma"] == 0.5


def test_interrupted_run_resumes_from_checkpoint(models, voc: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "interrupted.json"
    calls: list[str] = []
    original = Segmenter.segment

    def failing(self, image, vocabulary=None):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(Path(image).stem)
        return original(self, image, vocabulary)

    monkeypatch.setattr(Segmenter, "segment", failing)
    with pytest.raises(KeyboardInterrupt):
        evaluate(models, "voc21", voc, out=out, overrides=FAST, progress=False, checkpoint_every=2)
    partial = tmp_path / "interrupted.json.partial.voc21.rank0.json"
    assert not out.exists() and json.loads(partial.read_text())["scored"] == NAMES[:2]

    monkeypatch.setattr(Segmenter, "segment", lambda self, image, vocabulary=None: (
        calls.append(Path(image).stem), original(self, image, vocabulary))[1])
    calls.clear()
    section = evaluate(models, "voc21", voc, out=out, overrides=FAST, progress=False, checkpoint_every=2)
    assert calls == NAMES[2:]  # the checkpointed images were not scored again
    assert section["complete"] and not partial.exists()

    once = tmp_path / "once.json"
    evaluate(models, "voc21", voc, out=once, overrides=FAST, progress=False)
    assert json.loads(out.read_text())["datasets"] == json.loads(once.read_text())["datasets"]


def test_cli_two_datasets_print_config_and_paper_table(models, voc: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "results.json"
    argv = ["--dataset", "voc21", "--dataset", "voc20", "--data-root", str(voc), "--limit", "3",
            "--set", "short_side=64", "--out", str(out), "--no-progress"]
    assert main(argv, models=models) == 0
    text = capsys.readouterr().out
    assert '"short_side": 64' in text and '"gamma": 0.4' in text  # each dataset's resolved config
    assert "| | V21* | PC60 | Obj | V20* | PC59 | Stuff | City | ADE | avg |" in text
    data = json.loads(out.read_text())
    v21, v20 = data["datasets"]["voc21"], data["datasets"]["voc20"]
    assert {"mIoU", "aAcc", "mAcc", "IoU", "Acc"} <= set(v21)
    assert len(v21["IoU"]) == 21 and len(v20["IoU"]) == 20 and "background" not in v20["IoU"]
    assert data["summary"]["mIoU"]["V21"] == v21["mIoU"] and data["summary"]["mIoU"]["PC60"] is None
    assert data["summary"]["mIoU"]["avg"] == pytest.approx(round((v21["mIoU"] + v20["mIoU"]) / 2, 2))


def test_cli_rejects_bad_keys_before_loading_models(voc: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--dataset", "voc21", "--data-root", str(voc), "--set", "gama=0.1"], models=object())
    assert "gama" in capsys.readouterr().err


@pytest.fixture
def model_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every attempt of cass-eval to load models from its flags (the attempt then fails)."""
    import cass_plugins.cli.evaluate as cli_evaluate

    calls: list[str] = []

    def loading(args):
        calls.append(args.clip)
        raise RuntimeError("models would load here")

    monkeypatch.setattr(cli_evaluate, "models_from_args", loading)
    return calls


def _usage_error(capsys, argv: list[str], **kwargs) -> str:
    """Run cass-eval expecting exit status 2; returns the error line (the message is one line, no usage dump)."""
    with pytest.raises(SystemExit) as exc:
        main(argv, **kwargs)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0].startswith("cass-eval: error: ") and "usage:" not in err and "Traceback" not in err
    assert lines[1:] == ["(run cass-eval --help for the options)"]
    return lines[0]


@pytest.mark.parametrize("value, message", [
    ("gamma=abc", "ops.gamma='abc': expected a number"),
    ("spectral.rank=abc", "spectral.rank='abc': expected an integer"),
    ("lowrank=exactt", "spectral.lowrank='exactt': choose one of 'randomized', 'exact'"),
])
def test_cli_bad_set_value_is_one_line_exit_2(voc: Path, capsys, model_loads, value: str, message: str) -> None:
    line = _usage_error(capsys, ["--dataset", "voc21", "--data-root", str(voc), "--set", value])
    assert message in line
    assert model_loads == []


def test_cli_missing_data_root_exits_2_before_models(tmp_path: Path, capsys, model_loads) -> None:
    missing = tmp_path / "no_such_data"
    line = _usage_error(capsys, ["--dataset", "voc21", "--data-root", str(missing)])
    assert f"dataset root {missing} does not exist" in line and "VOCdevkit/VOC2012" in line
    assert model_loads == []
    line = _usage_error(capsys, ["--dataset", "voc21", "--data-root", " "])
    assert "--data-root is empty" in line and model_loads == []


def test_cli_data_root_without_layout_names_expected_path(tmp_path: Path, capsys, model_loads) -> None:
    empty = tmp_path / "data"
    empty.mkdir()
    line = _usage_error(capsys, ["--dataset", "voc21", "--data-root", str(empty)])
    # both places an image folder may be: the root itself, or the conventional root inside it
    assert str(empty / "JPEGImages") in line and str(empty / "VOCdevkit" / "VOC2012" / "JPEGImages") in line
    # images but no labels: the label folder is named, with how labels are produced
    (empty / "VOCdevkit" / "VOC2012" / "JPEGImages").mkdir(parents=True)
    line = _usage_error(capsys, ["--dataset", "voc21", "--data-root", str(empty)])
    assert f"label folder {empty / 'VOCdevkit' / 'VOC2012' / 'SegmentationClass'} not found" in line
    # the second dataset is checked too, before anything runs on the first
    line = _usage_error(capsys, ["--dataset", "voc21", "--dataset", "context59", "--data-root",
                                 str(empty.parent)])
    assert line.startswith("cass-eval: error: voc21: ") and model_loads == []


def test_cli_data_root_checked_for_every_dataset(voc: Path, capsys, model_loads) -> None:
    line = _usage_error(capsys, ["--dataset", "voc21", "--dataset", "ade20k", "--data-root", str(voc)])
    assert line.startswith("cass-eval: error: ade20k: image folder not found")
    assert str(voc / "ade" / "ADEChallengeData2016" / "images" / "validation") in line
    assert model_loads == []


def test_cli_resume_with_other_setting_fails_before_models(models, voc: Path, tmp_path: Path, capsys,
                                                           model_loads) -> None:
    out = tmp_path / "stored.json"
    base = ["--dataset", "voc21", "--data-root", str(voc), "--limit", "1", "--no-progress", "--out", str(out)]
    assert main(base + ["--set", "short_side=64"], models=models) == 0
    capsys.readouterr()
    stored = json.loads(out.read_text())

    gamma = stored["datasets"]["voc21"]["config"]["ops"]["gamma"]  # VOC21's value of the preset
    assert gamma != 0.5 and stored["datasets"]["voc21"]["config"]["pipeline"]["pamr_steps"] == 0
    line = _usage_error(capsys, base + ["--set", "short_side=64", "ops.gamma=0.5", "pamr_steps=3"])
    assert "different configuration" in line
    assert f"ops.gamma: stored {gamma}, now 0.5; pipeline.pamr_steps: stored 0, now 3)" in line
    assert "pipeline.short_side" not in line  # equal keys are not listed
    assert "another --out" in line and "--restart" in line
    assert model_loads == [] and json.loads(out.read_text()) == stored  # nothing loaded, nothing written

    # --restart discards the stored result: the run goes on to load the models
    with pytest.raises(RuntimeError, match="models would load here"):
        main(base + ["--set", "short_side=64", "ops.gamma=0.5", "--restart"])
    assert len(model_loads) == 1

    # a checkpoint left by an interrupted run is checked as well, with no result file next to it
    partial = tmp_path / "stored.json.partial.voc21.rank0.json"
    partial.write_text(json.dumps({**stored["datasets"]["voc21"], "scored": [], "state": None}))
    out.unlink()
    line = _usage_error(capsys, base + ["--set", "short_side=64", "ops.gamma=0.5"])
    assert line.startswith(f"cass-eval: error: checkpoint {partial} was produced with a different configuration")
    assert len(model_loads) == 1


def test_cli_resume_with_other_model_flags_fails_before_models(models, voc: Path, tmp_path: Path, capsys,
                                                               monkeypatch) -> None:
    import cass_plugins.cli.evaluate as cli_evaluate

    loads: list[str] = []
    monkeypatch.setattr(cli_evaluate, "models_from_args", lambda args: (loads.append(args.pretrained), models)[1])
    out = tmp_path / "flags.json"
    argv = ["--dataset", "voc21", "--data-root", str(voc), "--limit", "1", "--no-progress", "--out", str(out),
            "--set", "short_side=64", "--device", "cpu", "--clip", "ViT-B-16"]
    assert main(argv + ["--pretrained", "a.pt"]) == 0
    capsys.readouterr()
    line = _usage_error(capsys, argv + ["--pretrained", "b.pt"])
    assert "was produced with other models (--pretrained: stored 'a.pt', now 'b.pt')" in line
    assert loads == ["a.pt"]
    # the same flags resume (a larger --limit scores the next image)
    assert main(argv + ["--pretrained", "a.pt", "--limit", "2"]) == 0
    assert loads == ["a.pt", "a.pt"] and json.loads(out.read_text())["datasets"]["voc21"]["num_images"] == 2


def test_cli_out_that_is_not_a_result_exits_2(voc: Path, tmp_path: Path, capsys, model_loads) -> None:
    out = tmp_path / "notes.json"
    out.write_text('{"format": "something else"}')
    line = _usage_error(capsys, ["--dataset", "voc21", "--data-root", str(voc), "--out", str(out)])
    assert f"{out} is not a cass-eval result" in line and model_loads == []


def test_vocabulary_must_fit_dataset(models, voc: Path) -> None:
    with pytest.raises(ValueError, match="21 classes but the vocabulary has 2"):
        evaluate(models, "voc21", voc, vocabulary="cat; dog", progress=False)


def test_paper_table_order_and_average() -> None:
    def sec(name: str, miou: float, complete: bool = True) -> dict:
        return {"display_name": name, "mIoU": miou, "aAcc": 90.0, "complete": complete, "num_images": 1,
                "num_images_total": 2}

    table = format_paper_table({"ade20k": sec("ADE", 20.4), "voc21": sec("V21", 65.8, complete=False)})
    lines = table.splitlines()
    assert lines[0] == "| | V21* | PC60 | Obj | V20 | PC59 | Stuff | City | ADE | avg |"
    assert lines[2] == "| mIoU | 65.80 | – | – | – | – | – | – | 20.40 | 43.10 |"
    assert "avg over the 2 evaluated" in table.lower() and "V21 1/2" in table


def test_distributed_gloo_two_processes_equal_one_process(voc: Path, tmp_path: Path) -> None:
    argv = ["--dataset", "voc21", "--data-root", str(voc), "--set", "short_side=64", "--no-progress",
            "--device", "cpu", "--checkpoint-every", "1"]
    single = tmp_path / "single.json"
    # Fresh models: text embeddings are computed here, as in the workers, with one thread (see one_thread).
    assert torch.get_num_threads() == 1
    assert main(argv + ["--out", str(single)], models=(make_tiny_clip(), make_tiny_vfm())) == 0

    dist = tmp_path / "dist.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "_dist_eval_worker.py"), *argv, "--out", str(dist)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| background |" in proc.stdout  # rank 0 printed the per-class table
    assert json.loads(dist.read_text()) == json.loads(single.read_text())
    assert json.loads(dist.read_text())["datasets"]["voc21"]["num_images"] == len(NAMES)  # 3 + 2, none twice
    assert not list(tmp_path.glob("*.partial.*"))


@pytest.mark.slow
def test_cass_eval_full_size_random_checkpoints(voc: Path, tmp_path: Path, monkeypatch, capsys, one_thread) -> None:
    """cass-eval end to end with ViT-B/16 + ViT-B/8 random weights given as checkpoint files on the command line."""
    torch.set_num_threads(one_thread)  # full-size models do use the cores (back to 1 at the end)
    try:
        _run_full_size(voc, tmp_path, monkeypatch, capsys)
    finally:
        torch.set_num_threads(1)


def _run_full_size(voc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import functools

    import open_clip
    import timm

    import cass_plugins.pipeline.segmenter as segmenter_module

    torch.manual_seed(0)
    clip_ckpt, vfm_ckpt = tmp_path / "clip_random.pt", tmp_path / "vfm_random.pt"
    torch.save(open_clip.create_model("ViT-B-16", pretrained=None).state_dict(), clip_ckpt)
    torch.save(timm.create_model("vit_base_patch8_224", pretrained=False, num_classes=0).state_dict(), vfm_ckpt)
    # The 80-template classifier costs ~7 s per query for a full-size text tower on a 2-core CPU (56 VOC21 queries:
    # minutes); one template keeps the test about the evaluation path, not the text encoder.
    monkeypatch.setattr(segmenter_module, "encode_text",
                        functools.partial(segmenter_module.encode_text, templates=("a photo of a {}.",)))
    out = tmp_path / "full.json"
    argv = ["--dataset", "voc21", "--data-root", str(voc), "--clip", "ViT-B-16", "--pretrained", str(clip_ckpt),
            "--vfm", "vit_base_patch8_224", "--vfm-weights", str(vfm_ckpt), "--device", "cpu", "--limit", "2",
            "--set", "short_side=224", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert '"baseline": "naclip"' in text and "| aAcc | mIoU | mAcc |" in text
    section = json.loads(out.read_text())["datasets"]["voc21"]
    assert section["scored"] == NAMES[:2] and section["config"]["pipeline"]["mode"] == "whole"
    assert section["models"]["clip"]["parameters"] > 100_000_000
    assert section["models"]["flags"]["pretrained"] == str(clip_ckpt)
    assert 0.0 <= section["mIoU"] <= 100.0
