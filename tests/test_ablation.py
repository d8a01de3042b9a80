"""CASS Table 3 rows as configurations, and the ``cass-ablate`` harness on tiny random models."""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_clip, make_tiny_vfm

from cass_plugins.cli import ablate
from cass_plugins.evaluation.ablation import (
    ABLATION_ROWS, PAPER_ROWS, ablation_config, format_table, resolve_rows, run_ablation,
)
from cass_plugins.core.config import resolve_config

TINY = dict(short_side=64, crop=64, stride=32)  # keep the tiny models' windows small
VOCAB = ["sky", "cat; kitten", "dog"]


def _diff(a, b) -> set[str]:
    """Settings that differ as ``section.key``, and components switched on as ``+name``."""
    da, db = a.to_dict(), b.to_dict()
    out = {f"+{c}" for c in set(db.pop("components")) - set(da.pop("components"))}
    out |= {f"-{c}" for c in set(a.components) - set(b.components)}
    for section in da:
        if isinstance(da[section], dict):
            out |= {f"{section}.{k}" for k in da[section] if da[section][k] != db[section][k]}
        elif da[section] != db[section]:
            out.add(section)
    return out


def test_rows_add_one_component_each():
    rows = [ablation_config(r) for r in ABLATION_ROWS]
    vanilla, vfm_graph, matching, low_rank, eigen, ops, ota, sam_refine, sam_aggregate = rows
    assert not (vanilla.spectral or vanilla.presence_prior or vanilla.ota)
    assert (vanilla.baseline, vanilla.attn, vanilla.gaussian_std, vanilla.include_cls) == ("naclip", "naclip", 5.0, False)
    assert vfm_graph.spectral and vfm_graph.matching == "sequential" and vfm_graph.lowrank is None
    assert not vfm_graph.eigenscaling
    assert _diff(vanilla, vfm_graph) == {"+spectral", "spectral.matching", "spectral.lowrank", "spectral.eigenscaling"}
    assert _diff(vfm_graph, matching) == {"spectral.matching"}
    assert _diff(matching, low_rank) == {"spectral.lowrank"}
    assert _diff(low_rank, eigen) == {"spectral.eigenscaling"}
    assert _diff(eigen, ops) == {"+ops"}
    assert _diff(ops, ota) == {"+ota"}
    assert ota == resolve_config("cass-official")
    # beyond the paper: Trident's SAM stages on the full model
    assert _diff(ota, sam_refine) == {"+sam_refine"}
    assert _diff(sam_refine, sam_aggregate) == {"+sam_aggregate", "pipeline.mode"}
    assert sam_aggregate.pipeline.mode == "splice"


def test_rows_follow_preset_and_dataset_values():
    # VOC20 runs cass-official without eigenscaling: the "+eigenscaling" row keeps the dataset's value
    assert ablation_config("+eigenscaling", dataset="voc20").eigenscaling is False
    assert ablation_config("full", dataset="voc20") == resolve_config("cass-official", "voc20")
    assert ablation_config("+low-rank", preset="cass-paper").lowrank == "energy"


def test_resolve_rows():
    assert resolve_rows(None) == list(PAPER_ROWS) == list(ABLATION_ROWS)[:7]
    assert resolve_rows("9,8") == ["+sam-refine", "+sam-aggregate"]
    assert resolve_rows("7,1,#3") == ["vanilla", "+matching", "+ota"]
    assert resolve_rows(["full", "+ota"]) == ["+ota"]
    with pytest.raises(ValueError, match="unknown ablation row"):
        resolve_rows("10")


def _images(n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (3, 48, 72), dtype=torch.uint8, generator=g) for _ in range(n)]


def test_run_ablation_agreement_and_miou():
    model, vfm = make_tiny_clip(), make_tiny_vfm()
    images = _images()
    res = run_ablation(model, vfm, images, rows=["vanilla"], vocabulary=VOCAB, warmup=0, **TINY)
    # the full model is run as the reference and joins the table
    assert [r.row for r in res] == ["vanilla", "+ota"]
    full = res[1]
    assert full.agreement == 100.0 and 0.0 <= res[0].agreement <= 100.0
    assert all(r.seconds_per_image > 0 and r.miou is None for r in res)
    # agreement is the fraction of equal pixels: recompute it from the two rows' own label maps
    from cass_plugins.pipeline.segmenter import Segmenter

    maps = {}
    for row in ("vanilla", "+ota"):
        with Segmenter(model, vfm, vocabulary=VOCAB, **ABLATION_ROWS[row], **TINY) as seg:
            maps[row] = [seg.segment(im).labels for im in images]
    same = sum(int((a == b).sum()) for a, b in zip(maps["vanilla"], maps["+ota"]))
    assert res[0].agreement == pytest.approx(100.0 * same / sum(m.numel() for m in maps["vanilla"]))

    # with labels: the full model scored against its own predictions is perfect; no agreement by default
    res = run_ablation(model, vfm, images, rows=["full"], vocabulary=VOCAB, labels=maps["+ota"], warmup=0, **TINY)
    assert [r.row for r in res] == ["+ota"] and res[0].miou == 100.0 and res[0].agreement is None
    table = format_table(res, "voc21")
    assert "paper mIoU (voc21)" in table and "65.8" in table and "100.00" in table


def test_cli_prints_table(monkeypatch, tmp_path, capsys):
    from PIL import Image

    for i, im in enumerate(_images()):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp_path / f"im{i}.png")
    monkeypatch.setattr(ablate, "models_from_args", lambda args: (make_tiny_clip(), None, make_tiny_vfm()))
    out = tmp_path / "table.md"
    argv = [str(tmp_path), "--rows", "1,+ops", "--classes", "sky; cat, kitten", "--warmup", "0", "--out", str(out),
            "--set", "short_side=64", "crop=64", "stride=32"]
    assert ablate.main(argv) == 0
    printed = capsys.readouterr().out
    assert "#1 vanilla" in printed and "#6 + OPS" in printed and "#7 + OTA (full)" in printed
    assert "2 image(s)" in printed and out.read_text().strip().endswith(printed.strip().splitlines()[-1])


@pytest.mark.parametrize("extra, message", [
    (["--rows", "1,10"], "unknown ablation row '10'"),
    (["--rows", "+ota,9"], "sam_vit_b_01ec64.pth once and pass it: --sam-weights FILE"),
    (["--sam-weights", "random"], "no component uses SAM"),
    (["--set", "gamma=abc"], "ops.gamma='abc': expected a number"),
    (["--set", "lowrank=exactt"], "spectral.lowrank='exactt': choose one of"),
    (["--set", "gama=0.1"], "unknown configuration key 'gama'"),
    (["--vfm", "none"], "rows with the VFM graph need a VFM"),
    (["--limit", "0"], "--limit must be a positive number of images, got 0"),
])
def test_cli_bad_input_one_line_exit_2_before_models(monkeypatch, tmp_path, capsys, extra, message):
    from PIL import Image

    Image.fromarray(_images(1)[0].permute(1, 2, 0).numpy()).save(tmp_path / "im.png")
    loads = []
    monkeypatch.setattr(ablate, "models_from_args", lambda args: loads.append(args) or 1 / 0)
    with pytest.raises(SystemExit) as exc:
        ablate.main([str(tmp_path / "im.png"), "--classes", "sky; cat", *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("cass-ablate: error: ") and message in err[0]
    assert err[1:] == ["(run cass-ablate --help for the options)"]
    assert loads == []


def test_cli_missing_inputs_exit_2_before_models(monkeypatch, tmp_path, capsys):
    loads = []
    monkeypatch.setattr(ablate, "models_from_args", lambda args: loads.append(args) or 1 / 0)
    cases = [
        ([str(tmp_path / "gone.jpg"), "--classes", "cat"], f"{tmp_path / 'gone.jpg'} is neither an image file"),
        ([str(tmp_path), "--classes", "cat"], "no images: give image files/folders"),  # an empty folder
        (["--dataset", "voc21", "--data-root", str(tmp_path / "nodata")],
         f"voc21: dataset root {tmp_path / 'nodata'} does not exist"),
        (["--data-root", str(tmp_path)], "--data-root needs --dataset"),
        ([str(tmp_path), "--classes-file", str(tmp_path / "classes.txt")], "no images"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            ablate.main(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err.splitlines()[0], argv
    from PIL import Image

    Image.fromarray(_images(1)[0].permute(1, 2, 0).numpy()).save(tmp_path / "im.png")
    with pytest.raises(SystemExit):
        ablate.main([str(tmp_path), "--classes-file", str(tmp_path / "classes.txt")])
    assert f"--classes-file {tmp_path / 'classes.txt'} does not exist" in capsys.readouterr().err
    assert loads == []
