"""``cass-segment``: help, --print-config, the files it writes, progress over several images, clean errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

import cass_plugins
import cass_plugins.cli.common as cli_common
import cass_plugins.cli.segment as cli
from cass_plugins.pipeline.segmenter import Segmenter
from conftest import TINY_CLIP, _register_tiny_clip, make_tiny_clip, make_tiny_vfm

CLASSES = "cat, kitten; dog; sky, clouds; grass"


def check_outputs(out: Path, stem: str, image: np.ndarray, num_classes: int) -> dict:
    """The three files of one image: overlay with legend, label map, JSON with areas matching the label map."""
    h, w = image.shape[:2]
    overlay = Image.open(out / f"{stem}_overlay.png")
    assert overlay.mode == "RGB" and overlay.width > w and overlay.height >= h  # the legend panel on the right
    labels = np.asarray(Image.open(out / f"{stem}_labels.png"))
    assert labels.shape == (h, w) and labels.max() < num_classes
    summary = json.loads((out / f"{stem}.json").read_text())
    assert summary["size"] == [h, w]
    areas = summary["areas"]
    assert list(areas) == summary["classes"] and len(areas) == num_classes
    assert sum(areas.values()) == pytest.approx(1.0)
    counts = np.bincount(labels.ravel(), minlength=num_classes) / labels.size
    assert np.allclose([areas[c] for c in summary["classes"]], counts)
    # the image is under the overlay: where alpha = 0.5 blends it, the left part differs from the legend's white
    left = np.asarray(overlay)[:h, :w].astype(int)
    assert np.abs(left - image.astype(int)).max() <= 128
    return summary


# ------------------------------------------------------------------------------------------------ help / config
def test_help_explains_everything(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for word in ("--classes", "--classes-file", "--dataset-classes", "--preset", "--dataset", "--set",
                 "--print-config", "--clip", "--pretrained", "--vfm", "--vfm-weights", "--device", "--out",
                 "_overlay.png", "_labels.png", ".json", "synonyms", "offline", "cass-official"):
        assert word in text, word


def test_python_m_cass_plugins_help():
    proc = subprocess.run([sys.executable, "-m", "cass_plugins", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: cass-segment")


def test_print_config_reflects_dataset_and_set(capsys):
    assert cli.main(["--print-config", "--dataset", "cityscapes", "--set", "gamma=0.33", "lowrank=exact",
                     "matching=[0,1,2,3,4,5,6,7,8,9,10,11]"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    # cityscapes values (cass.md §7) where not overridden, the --set values where they are
    pipe, spec = cfg["pipeline"], cfg["spectral"]
    assert pipe["dataset"] == "cityscapes" and pipe["short_side"] == 560 and pipe["prior_source"] == "crop"
    assert spec["eigenscaling"] is False and cfg["ota"]["alpha"] == 0.03 and cfg["ota"]["h_threshold"] == 0.14
    assert cfg["ops"]["gamma"] == 0.33 and spec["lowrank"] == "exact" and spec["matching"] == list(range(12))
    assert cli.main(["--print-config", "--dataset", "voc21", "--vfm", "none"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["pipeline"]["mode"] == "whole" and cfg["pipeline"]["prob_thd"] == 0.1
    assert cfg["components"] == ["ops", "ota"]


def test_print_config_rejects_unknown_keys_and_datasets(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--print-config", "--set", "gamma_typo=1"])
    assert "gamma_typo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--print-config", "--dataset", "mars"])
    assert "mars" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,api",
    [
        ([], {}),
        (["--dataset", "voc21"], {"dataset": "voc21"}),
        (["--dataset", "cityscapes", "--set", "gamma=0.5", "spectral.fusion_lambda=1"],
         {"dataset": "cityscapes", "gamma": 0.5, "spectral": {"fusion_lambda": 1.0}}),
        (["--preset", "cass-paper", "--dataset", "ade20k"], {"preset": "cass-paper", "dataset": "ade20k"}),
        (["--baseline", "sclip", "--set", "spectral=False"], {"baseline": "sclip", "spectral": False}),
        (["--baseline", "sclip", "--components", "spectral,ota"], {"baseline": "sclip", "components": ["spectral", "ota"]}),
        (["--vfm", "none"], {"spectral": False, "vfm": None}),
    ],
)
def test_printed_config_is_the_one_the_segmenter_uses(flags, api, capsys):
    """--print-config loads no model; what it prints must be what the same request through the Python API gives."""
    assert cli.main(["--print-config", *flags]) == 0
    printed = json.loads(capsys.readouterr().out)
    api = dict(api)
    vfm = api.pop("vfm") if "vfm" in api else make_tiny_vfm()
    with Segmenter(make_tiny_clip(), vfm, **api) as seg:
        assert json.loads(seg.describe()) == printed


# ------------------------------------------------------------------------------------------------ runs (tiny)
@pytest.fixture
def tiny_models(monkeypatch):
    """``--clip cass-tiny-vit --pretrained random`` goes through load_clip; the VFM loader returns a tiny ViT."""
    _register_tiny_clip()
    monkeypatch.setattr(cli_common, "load_vfm", lambda name, weights, **kw: make_tiny_vfm())
    return ["--clip", TINY_CLIP, "--pretrained", "random", "--vfm", "tiny", "--vfm-weights", "random",
            "--device", "cpu", "--set", "short_side=64", "crop=64", "stride=32", "--"]


def test_several_images_progress_bar_and_outputs(tiny_models, tmp_path, capsys):
    images = {"chelsea": data.chelsea(), "astronaut": data.astronaut()[::3, ::2]}
    for name, img in images.items():
        Image.fromarray(img).save(tmp_path / f"{name}.png")
    # a grayscale and a 16-bit image are converted, not rejected; two 'chelsea' stems do not overwrite each other
    (tmp_path / "sub").mkdir()
    gray = data.camera()[::4, ::3]
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "sub" / "chelsea.png")
    out = tmp_path / "out"
    paths = [str(tmp_path / "chelsea.png"), str(tmp_path / "astronaut.png"), str(tmp_path / "sub" / "chelsea.png")]
    assert cli.main(["--classes", CLASSES, "--out", str(out), *tiny_models, *paths]) == 0
    captured = capsys.readouterr()
    assert "segmenting" in captured.err and "3/3" in captured.err  # tqdm progress bar
    assert "wrote 9 files" in captured.out
    check_outputs(out, "chelsea", images["chelsea"], 4)
    summary = check_outputs(out, "astronaut", images["astronaut"], 4)
    check_outputs(out, "chelsea_1", np.repeat(gray[:, :, None], 3, axis=2), 4)
    assert summary["classes"] == ["cat", "dog", "sky", "grass"]
    assert summary["synonyms"][0] == ["cat", "kitten"] and summary["config"]["pipeline"]["short_side"] == 64
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{s}{suffix}" for s in ("chelsea", "astronaut", "chelsea_1") for suffix in ("_overlay.png", "_labels.png", ".json")
    )


def test_single_image_has_no_progress_bar(tiny_models, tmp_path, capsys):
    Image.fromarray(data.coffee()).save(tmp_path / "coffee.jpg")
    assert cli.main(["--dataset-classes", "cityscapes", "--out", str(tmp_path), *tiny_models,
                     str(tmp_path / "coffee.jpg")]) == 0
    assert "segmenting" not in capsys.readouterr().err
    check_outputs(tmp_path, "coffee", np.asarray(Image.open(tmp_path / "coffee.jpg").convert("RGB")), 19)


def test_clean_errors(tiny_models, tmp_path, capsys):
    Image.fromarray(data.chelsea()).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    cases = [
        (["--classes", "cat; dog", str(tmp_path / "missing.jpg")], "not found: "),
        (["--classes", "", str(tmp_path / "ok.png")], "empty vocabulary"),
        (["--classes", "cat; cat", str(tmp_path / "ok.png")], "duplicate class name"),
        ([str(tmp_path / "ok.png")], "give the classes"),
        (["--classes", "cat", "--set", "gamma=0.1", str(tmp_path / "ok.png")], "put the image files before --set"),
        (["--classes", "cat"], "at least one image"),
        (["--classes", "cat", "--clip", "ViT-B-16", "--pretrained", str(tmp_path / "no.pt"),
          str(tmp_path / "ok.png")], "checkpoint file not found"),
        (["--classes", "cat", "--out", str(tmp_path / "ok.png"), str(tmp_path / "ok.png")],
         "is an existing file; give a folder"),
        (["--classes", "cat", "--out", str(tmp_path / "ok.png" / "sub"), str(tmp_path / "ok.png")],
         "cannot create the --out folder"),
        (["--classes", "cat", "--clip", "RN50", str(tmp_path / "ok.png")], "a ViT is required"),
    ]
    _register_tiny_clip()
    for argv, message in cases:
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2, (argv, info.value.code)  # usage errors
        text = capsys.readouterr().err
        assert message in text, (argv, text)
        assert "Traceback" not in text and len(text.strip().splitlines()) <= 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.png", "ok.png"]  # nothing written, no folder made


def test_duplicate_class_message_names_what_the_cli_user_can_do(tmp_path, capsys):
    Image.fromarray(data.chelsea()).save(tmp_path / "ok.png")
    with pytest.raises(SystemExit) as info:
        cli.main(["--classes", "cat; dog; cat", str(tmp_path / "ok.png")])
    assert info.value.code == 2
    text = capsys.readouterr().err
    assert "duplicate class name 'cat'" in text and "delete or rename the repeat" in text
    assert "allow_duplicates" not in text


def test_bad_image_among_many_is_skipped(tiny_models, tmp_path, capsys):
    Image.fromarray(data.chelsea()[::4, ::4]).save(tmp_path / "a.png")
    Image.fromarray(data.astronaut()[::4, ::4]).save(tmp_path / "c.png")
    (tmp_path / "b.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    images = [str(tmp_path / n) for n in ("a.png", "b.png", "c.png")]
    assert cli.main(["--classes", "cat; sky", "--out", str(out), *tiny_models, *images]) == 1
    captured = capsys.readouterr()
    assert "b.png is not an image" in captured.err and "1 of 3 images failed" in captured.err
    assert "Traceback" not in captured.err and "wrote 6 files" in captured.out
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{s}{x}" for s in "ac" for x in ("_overlay.png", "_labels.png", ".json"))
    # --no-keep-going: stops at the bad image, exit status 1, nothing after it
    out2 = tmp_path / "out2"
    with pytest.raises(SystemExit) as info:
        cli.main(["--classes", "cat; sky", "--no-keep-going", "--out", str(out2), *tiny_models,
                  images[1], images[0]])
    assert info.value.code == 1
    assert "b.png is not an image" in capsys.readouterr().err
    assert list(out2.iterdir()) == []


def test_failed_write_leaves_no_partial_set_and_debug_shows_traceback(tiny_models, tmp_path, capsys, monkeypatch):
    import cass_plugins.pipeline.visualize as visualize

    Image.fromarray(data.chelsea()[::4, ::4]).save(tmp_path / "a.png")
    out = tmp_path / "out"

    def broken(path, labels):
        Path(path).write_bytes(b"half")  # a half-written file, then the failure
        raise OSError("disk full")

    monkeypatch.setattr(visualize, "save_label_map", broken)
    argv = ["--classes", "cat; sky", "--out", str(out), *tiny_models[:-1], "--", str(tmp_path / "a.png")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "OSError: disk full" in err and "Traceback" not in err
    assert list(out.iterdir()) == []  # neither the overlay written before nor the temporary files remain
    with pytest.raises(OSError, match="disk full"):
        cli.main(["--debug", "--no-keep-going", *argv])


def test_runtime_error_is_one_line_exit_1(tiny_models, tmp_path, capsys, monkeypatch):
    from cass_plugins.backbone.loading import WeightsUnavailableError

    def offline(*a, **k):
        raise WeightsUnavailableError("could not obtain open_clip weights;\noffline? pass local files")

    monkeypatch.setattr(cli_common, "load_clip", offline)
    Image.fromarray(data.chelsea()[::4, ::4]).save(tmp_path / "a.png")
    with pytest.raises(SystemExit) as info:
        cli.main(["--classes", "cat", "--out", str(tmp_path / "o"), str(tmp_path / "a.png")])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "could not obtain" in err and "Traceback" not in err and len(err.strip().splitlines()) == 2


def test_fp16_on_cpu_warns(tiny_models, tmp_path, caplog):
    Image.fromarray(data.chelsea()[::4, ::4]).save(tmp_path / "a.png")
    monkey_argv = ["--classes", "cat; sky", "--out", str(tmp_path / "o"), "--precision", "fp16", *tiny_models,
                   str(tmp_path / "a.png")]
    import logging

    with caplog.at_level(logging.WARNING):
        try:
            cli.main(monkey_argv)
        except SystemExit:
            pass  # fp16 CPU kernels may be missing; the warning comes before any model runs
    assert "slower than fp32" in caplog.text


def test_json_records_models_checkpoints_and_versions(tiny_models, tmp_path):
    import hashlib

    Image.fromarray(data.chelsea()[::4, ::4]).save(tmp_path / "a.png")
    clip_file = tmp_path / "clip.pth"
    torch.save(make_tiny_clip(seed=5).state_dict(), clip_file)
    argv = ["--classes", "cat; sky", "--out", str(tmp_path / "o"), *tiny_models[:-1], "--pretrained",
            str(clip_file), "--", str(tmp_path / "a.png")]
    assert cli.main(argv) == 0
    summary = json.loads((tmp_path / "o" / "a.json").read_text())
    assert summary["models"]["clip"] == TINY_CLIP
    assert summary["models"]["pretrained"] == {
        "file": "clip.pth", "sha256": hashlib.sha256(clip_file.read_bytes()).hexdigest()}
    assert summary["models"]["vfm_weights"] == {"tag": "random"}
    assert summary["versions"]["torch"] == torch.__version__ and summary["versions"]["cass_plugins"] == cass_plugins.__version__
    assert summary["device"] == "cpu" and summary["precision"] == "fp32"


def test_dino_checkpoint_as_pretrained_is_a_usage_error(tmp_path, capsys):
    _register_tiny_clip()
    Image.fromarray(data.chelsea()[::4, ::4]).save(tmp_path / "a.png")
    dino = tmp_path / "dino_vitbase8_pretrain.pth"
    torch.save(make_tiny_vfm().state_dict(), dino)
    with pytest.raises(SystemExit) as info:
        cli.main(["--classes", "cat", "--clip", TINY_CLIP, "--pretrained", str(dino), "--out", str(tmp_path / "o"),
                  str(tmp_path / "a.png")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "looks like a timm/DINO ViT checkpoint; pass it as --vfm-weights" in err and "Traceback" not in err


def test_help_does_not_recommend_torchscript(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert ".pt " not in text and ".pt\n" not in text and "--vfm-weights" in text and "random" in text


# ------------------------------------------------------------------------------------------------ full size
@pytest.mark.slow
def test_full_size_random_checkpoints_on_a_photo(tmp_path, capsys):
    """ViT-B/16 + DINO ViT-B/8 architectures with random weights saved as checkpoint files, on a real photo."""
    import open_clip
    import timm

    torch.manual_seed(0)
    clip_file = tmp_path / "clip_vit_b16_random.pt"
    torch.save(open_clip.create_model("ViT-B-16", pretrained=None).state_dict(), clip_file)
    vfm_file = tmp_path / "dino_vitb8_random.pth"
    torch.save(timm.create_model("vit_base_patch8_224", pretrained=False, num_classes=0).state_dict(), vfm_file)
    photo = data.astronaut()  # 512×512 → 336×336: 2×2 windows (few classes and windows keep this under a minute)
    Image.fromarray(photo).save(tmp_path / "astronaut.jpg", quality=95)
    decoded = np.asarray(Image.open(tmp_path / "astronaut.jpg"))
    out = tmp_path / "out"
    assert cli.main([str(tmp_path / "astronaut.jpg"), "--classes", "person, astronaut; flag",
                     "--clip", "ViT-B-16", "--pretrained", str(clip_file), "--vfm", "vit_base_patch8_224",
                     "--vfm-weights", str(vfm_file), "--device", "cpu", "--out", str(out)]) == 0
    summary = check_outputs(out, "astronaut", decoded, 2)
    assert summary["config"]["pipeline"]["short_side"] == 336 and "spectral" in summary["config"]["components"]
    assert "wrote 3 files" in capsys.readouterr().out


def test_set_value_errors_do_not_blame_image_files(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--print-config", "--set", "stride=500"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "pipeline.stride=500 exceeds pipeline.crop=224" in err
    assert "image files" not in err


def test_trident_offline_with_local_files_writes_the_usual_outputs(tiny_models, tmp_path, capsys):
    """``--preset trident --sam-weights FILE``: a local SAM checkpoint, overlay/labels/JSON as for every preset."""
    from tiny_sam import random_image, save_tiny_sam_checkpoint

    sam_file = save_tiny_sam_checkpoint(tmp_path / "sam_tiny.pth")
    photo = random_image(70, 100)
    Image.fromarray(photo).save(tmp_path / "scene.png")
    out = tmp_path / "out"
    argv = ["--classes", "cat; dog; sky", "--preset", "trident", "--sam", "test", "--sam-weights", str(sam_file),
            "--out", str(out), *tiny_models, str(tmp_path / "scene.png")]
    assert cli.main(argv) == 0
    summary = check_outputs(out, "scene", photo, 3)
    assert summary["config"]["components"] == ["sam_aggregate", "sam_refine"]
    assert summary["config"]["pipeline"]["mode"] == "splice"
    assert summary["models"]["sam"] == "test" and summary["models"]["sam_weights"]["file"] == "sam_tiny.pth"


@pytest.mark.parametrize("extra, message, code", [
    (["--preset", "trident"], "sam_vit_b_01ec64.pth once and pass it: --sam-weights FILE", 1),  # offline: runtime
    (["--sam-weights", "random"], "no component uses SAM", 2),
    (["--sam-backend", "timm"], "--sam-backend given but no component uses SAM", 2),
    (["--preset", "trident", "--sam", "test", "--sam-weights", "random", "--sam-backend", "timm"],
     "sam_refine needs SAM's prompt encoder and mask decoder", 2),
    (["--preset", "trident", "--sam-weights", "missing.pth"], "missing.pth", 2),
    (["--components", "ops,sam_aggregate"], "only mode='splice' builds", 2),
])
def test_sam_usage_errors_before_the_clip_loads(tiny_models, tmp_path, capsys, monkeypatch, extra, message, code):
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "im.png")
    monkeypatch.setattr(cli_common, "load_clip", lambda *a, **k: 1 / 0)
    with pytest.raises(SystemExit) as info:
        cli.main(["--classes", "cat; dog", "--out", str(tmp_path / "o"), *extra, *tiny_models,
                  str(tmp_path / "im.png")])
    assert info.value.code == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_compile_flag_reaches_the_segmenter(tiny_models, tmp_path, monkeypatch):
    """``--compile`` is accepted by every CLI, so it must take effect: cass-segment and cass-ablate pass it on."""
    from cass_plugins.cli import ablate
    from cass_plugins.pipeline import segmenter as segmenter_module

    seen = []
    original = segmenter_module.Segmenter.__init__

    def recording(self, *args, **kwargs):
        seen.append(kwargs.get("compile"))
        original(self, *args, **{**kwargs, "compile": False})  # the flag's path, without minutes of compiling

    monkeypatch.setattr(segmenter_module.Segmenter, "__init__", recording)
    Image.fromarray(data.chelsea()[::4, ::4]).save(tmp_path / "cat.png")
    assert cli.main(["--classes", "cat; sky", "--compile", "--out", str(tmp_path / "o"), *tiny_models,
                     str(tmp_path / "cat.png")]) == 0
    assert seen == [True]
    calls = []
    monkeypatch.setattr(ablate, "run_ablation", lambda *a, **k: calls.append(k.get("compile")) or [])
    monkeypatch.setattr(ablate, "format_table", lambda *a, **k: "")
    ablate.main([str(tmp_path / "cat.png"), "--classes", "cat; sky", "--rows", "1", "--compile", *tiny_models[:-1]])
    assert calls == [True]
