"""The component model: every component installed by ``patch_clip``, the text side for third-party code, a
third-party component installed through the entry-point group, and the import structure (no core → adapters)."""
from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_clip, make_tiny_vfm

import cass_plugins as cp
from cass_plugins.core.registry import REGISTRY
from cass_plugins.pipeline.postprocess import upsample_logits
from cass_plugins.pipeline.text import encode_text
from cass_plugins.pipeline.vocabulary import Vocabulary

ROOT = Path(__file__).resolve().parents[1]
VOCAB = "cat; dog, puppy; sky"


def _whole(seed: int = 0, h: int = 64, w: int = 96) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, h, w, generator=g)


def _text(n: int = 4, d: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


# ------------------------------------------------------------------------------------------ every component installed
def test_patch_clip_installs_ops_and_ota_on_another_baseline():
    clip, vfm = make_tiny_clip(), make_tiny_vfm()
    whole, text = _whole(), _text()
    crop = whole[:, :, :, :64]
    with torch.no_grad():
        with cp.patch_clip(clip, vfm, baseline="sclip", components=["spectral"]) as plain:
            base = plain.logits(crop, text, image=whole)
            features = cp.encode_dense(clip, crop).features
            prior = cp.cosine_prior(cp.image_embedding(clip, whole), text)
        with cp.patch_clip(clip, vfm, baseline="sclip", components=["spectral", "ops", "ota"], gamma=0.3) as full:
            names = {n for n, _ in full.pm.list_name_plugin()}
            both = full.logits(crop, text, image=whole)
        with cp.patch_clip(clip, vfm, baseline="sclip", components=["spectral", "ops"], gamma=0.3) as ops_only:
            with_ops = ops_only.logits(crop, text, image=whole)
    assert {"baseline", "spectral", "ops", "ota"} <= names
    # OPS, recomputed here from its formula: S* = (1 − γ)·S + γ·P, P = cos(whole-image embedding, t)
    s = torch.einsum("bhwd,qd->bqhw", F.normalize(features.double(), dim=-1), text.double())
    expected = 0.7 * s + 0.3 * prior.double()[:, :, None, None]
    torch.testing.assert_close(base.double(), s, rtol=0, atol=1e-6)
    torch.testing.assert_close(with_ops.double(), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(both, with_ops)  # OTA moved a query toward its top patches


def test_components_unknown_or_refused_are_errors_before_any_hook():
    clip, vfm = make_tiny_clip(), make_tiny_vfm()
    with pytest.raises(ValueError, match=r"unknown component\(s\) \['opz'\]"):
        cp.patch_clip(clip, vfm, components=["opz"])
    with pytest.raises(ValueError, match="spectral distillation.*maskclip"):
        cp.patch_clip(clip, vfm, baseline="maskclip", components=["spectral", "ops"])
    with pytest.raises(ValueError, match="component 'spectral' needs a VFM"):
        cp.patch_clip(clip, None, components=["spectral"])
    assert cp.get_patch(clip) is None


def test_prior_once_per_image_and_refused_without_an_image(monkeypatch):
    import cass_plugins.core.patch as patch_module

    calls = []
    real = patch_module.image_embedding
    monkeypatch.setattr(patch_module, "image_embedding", lambda m, x: calls.append(x.shape) or real(m, x))
    clip, vfm = make_tiny_clip(), make_tiny_vfm()
    whole, other, text = _whole(0), _whole(1), _text()
    with torch.no_grad(), cp.patch_clip(clip, vfm, components=["spectral", "ops"]) as handle:
        with pytest.raises(ValueError, match="pass image="):
            handle.logits(whole[:, :, :, :64], text)
        for x1 in (0, 16, 32):
            handle.logits(whole[:, :, :, x1:x1 + 64], text, image=whole)
        assert len(calls) == 1  # one whole-image pass for three windows
        handle.logits(other[:, :, :, :64], text, image=other)
        assert len(calls) == 2
        assert [m.window for m in handle.image_record["matching"]] == [0]  # counted from the new image on


def test_foreign_repo_example_logits_equal_the_segmenters():
    """examples/foreign_repo.py's sliding-window loop gives the Segmenter's logits on the same single window."""
    spec = importlib.util.spec_from_file_location("foreign_repo", ROOT / "examples" / "foreign_repo.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    clip, vfm = make_tiny_clip(), make_tiny_vfm()
    image = (torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8)
    kw = dict(short_side=64, crop=128, stride=64, lowrank="exact")  # one window covering the whole image
    with cp.Segmenter(clip, vfm, components=["spectral", "ops", "ota"], **kw) as seg:
        result = seg.segment(image, VOCAB)
        x, original = seg.preprocess(image)
        text = seg.text_embeddings(Vocabulary.parse(VOCAB))
    with torch.no_grad(), cp.patch_clip(clip, vfm, components=["spectral", "ops", "ota"], lowrank="exact") as handle:
        (window, logits), = example.sliding_window_logits(handle, x, text, crop=128, stride=64)
    assert window == (0, 64, 0, 96)
    ours = upsample_logits(F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)[0], original)
    torch.testing.assert_close(ours, result.logits, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ a third-party component
TOY = '''
"""A third-party component: scales every window's logits by its own setting."""
from dataclasses import dataclass

from cass_plugins import ComponentSpec, Settings, hookimpl, setting


@dataclass(frozen=True)
class ToyConfig(Settings):
    scale: float = setting(1.0, range=(0.0, None), exclusive=True, doc="logits × scale")


class Toy:
    def __init__(self, config, runtime=None):
        self.config = config

    @hookimpl
    def cass_refine_logits(self, ctx):
        ctx.logits = ctx.logits * self.config.scale


@hookimpl
def cass_register(registry):
    registry.add_component(ComponentSpec(name="toy", config_class=ToyConfig, factory=Toy, summary="scales logits"))
'''


@pytest.fixture
def toy_installed(tmp_path, monkeypatch):
    """``toy_cass_plugin`` installed as a distribution with a ``cass_plugins`` entry point (dist-info on sys.path)."""
    (tmp_path / "toy_cass_plugin.py").write_text(TOY)
    info = tmp_path / "toy_cass_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-cass-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[cass_plugins]\ntoy = toy_cass_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    REGISTRY.reset()
    yield tmp_path
    sys.modules.pop("toy_cass_plugin", None)
    monkeypatch.undo()
    REGISTRY.reset()


def test_third_party_component_from_patch_clip_and_segmenter(toy_installed):
    REGISTRY.load()
    assert "toy" in REGISTRY.components and REGISTRY.sources["component:toy"] == "toy_cass_plugin"
    clip, vfm = make_tiny_clip(), make_tiny_vfm()
    whole, text = _whole(), _text()
    with torch.no_grad():
        with cp.patch_clip(clip, vfm, components=["ops"]) as h:
            base = h.logits(whole, text, whole_image=True)
        with cp.patch_clip(clip, vfm, components=["ops", "toy"], **{"toy.scale": 2.5}) as h:
            assert h.config["toy"].scale == 2.5
            scaled = h.logits(whole, text, whole_image=True)
    torch.testing.assert_close(scaled, 2.5 * base, rtol=0, atol=1e-6)
    image = (torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    kw = dict(short_side=64, crop=64, stride=64)
    with cp.Segmenter(clip, vfm, components=["ops"], **kw) as seg:
        ref = seg.segment(image, VOCAB).logits
    with cp.Segmenter(clip, vfm, components=["ops", "toy"], toy={"scale": 3.0}, **kw) as seg:
        got = seg.segment(image, VOCAB).logits
    torch.testing.assert_close(got, 3.0 * ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"toy\.scale=-1\.0: must lie in \(0, inf\)"):
        cp.patch_clip(clip, vfm, components=["toy"], **{"toy.scale": -1.0})


def test_third_party_component_from_the_clis(toy_installed, capsys, tmp_path):
    from cass_plugins.cli.evaluate import main as eval_main
    from cass_plugins.cli.segment import main as segment_main

    assert segment_main(["--print-config", "--components", "ops,toy", "--set", "toy.scale=3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["components"] == ["ops", "toy"] and printed["toy"] == {"scale": 3.0}
    with pytest.raises(SystemExit) as exit_info:
        segment_main(["--print-config", "--components", "toy", "--set", "toy.scale=abc"])
    assert exit_info.value.code == 2 and "toy.scale='abc': expected a number" in capsys.readouterr().err
    # cass-eval resolves the same keys before it looks at the data (a bad value is refused first)
    with pytest.raises(SystemExit) as exit_info:
        eval_main(["--dataset", "voc21", "--data-root", str(tmp_path), "--components", "ops,toy",
                   "--set", "toy.scale=0"], models=object())
    assert exit_info.value.code == 2 and "toy.scale=0.0: must lie in (0, inf)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ import structure
def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Modules ``path`` imports (absolute names), at import time only or anywhere (except TYPE_CHECKING blocks)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1]).replace("adapters", "cass_plugins.adapters", 1)
    if path.parts[-2] == "adapters":
        package = "cass_plugins.adapters"
    found: set[str] = set()

    def visit(nodes: list[ast.AST]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                found.add(base)
            if top_level_only and not isinstance(node, (ast.If, ast.Try)):
                continue  # function and class bodies run later, not at import time
            for _, value in ast.iter_fields(node):
                if isinstance(value, list):
                    visit([v for v in value if isinstance(v, (ast.stmt, ast.excepthandler))])

    visit(tree.body)
    return {m for m in found if m.startswith("cass_plugins")}


def _subpackage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_core_never_imports_methods_and_subpackages_have_no_cycle():
    files = list((ROOT / "cass_plugins").rglob("*.py")) + list((ROOT / "adapters").glob("*.py"))
    for path in (ROOT / "cass_plugins" / "core").glob("*.py"):
        bad = {m for m in _imports(path, top_level_only=False) if _subpackage(m) in ("adapters", "cass", "pipeline",
                                                                                     "evaluation", "cli")}
        assert not bad, f"{path.name} imports {sorted(bad)}"
    graph: dict[str, set[str]] = {}
    for path in files:
        rel = path.relative_to(ROOT)
        src = "adapters" if rel.parts[0] == "adapters" else (rel.parts[1] if len(rel.parts) > 2 else "")
        if not src:
            continue  # cass_plugins/__init__.py is the flat API above everything
        deps = {_subpackage(m) for m in _imports(path, top_level_only=True)} - {src, ""}
        graph.setdefault(src, set()).update(deps)
    # no cycle among subpackages at import time (depth-first search)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join(trail + [node, nxt])}"
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_core_imports_with_the_adapters_unavailable():
    code = textwrap.dedent("""
        import sys
        sys.modules["cass_plugins.adapters"] = None  # any import of the adapters now fails
        import cass_plugins.core.hookspecs, cass_plugins.core.registry, cass_plugins.core.settings
        import cass_plugins.core.config, cass_plugins.core.baseline, cass_plugins.core.patch, cass_plugins.core.vfm
        import cass_plugins.core.block_hook
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_installs_no_top_level_adapters_next_to_another_adapters_package(tmp_path):
    """Another distribution's top-level ``adapters`` (the PyPI package of that name) and ours both import."""
    other = tmp_path / "adapters"
    other.mkdir()
    (other / "__init__.py").write_text("MARK = 'the other adapters package'\n")
    code = textwrap.dedent("""
        import adapters
        assert adapters.MARK == "the other adapters package", adapters.__file__
        from cass_plugins.core.registry import REGISTRY
        REGISTRY.load()
        import cass_plugins.adapters as ours
        assert ours.__name__ == "cass_plugins.adapters" and ours is not adapters
        print(sorted(REGISTRY.baselines))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=str(tmp_path), env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "sclip" in proc.stdout and "proxyclip" in proc.stdout
