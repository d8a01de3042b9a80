"""``patch_clip``: attach a baseline and components to any CLIP ViT; ``encode_dense``: read dense features;
``PatchHandle.logits``: the text side (text adjustment, cosine logits, presence prior) for third-party pipelines.

Data flow of one window: crops → CLIP blocks ∥ VFM (keys captured by a pre-hook) → last-block hook (baseline graphs →
component refinements → baseline output) → dense features → ``cass_adjust_text`` → cosine logits →
``cass_refine_logits`` (e.g. the presence prior) → logits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from cass_plugins.backbone.access import ViTAccess, vit_access
from .block_hook import LastBlockHook, PatchState
from .config import Config, resolve_config
from .hookspecs import ImageContext, LogitsContext, TextContext, make_plugin_manager
from .registry import REGISTRY
from .vfm import VFMRunner

if TYPE_CHECKING:  # pragma: no cover
    from cass_plugins.cass.matching import HeadMatching

__all__ = [
    "patch_clip", "PatchHandle", "PatchRuntime", "encode_dense", "DenseOutput", "encode_tokens", "DenseTokens", "image_embedding", "get_patch",
    "cosine_logits", "cosine_prior", "non_finite_message",
]

_HANDLE_ATTR = "_cass_patch_handle"


@dataclass
class PatchRuntime:
    """What a component's factory gets besides its settings: the CLIP access, the VFM runner, the shared state."""

    access: ViTAccess
    vfm: VFMRunner | None
    state: PatchState
    config: Config


@dataclass
class _ImageState:
    """The image a third-party pipeline is segmenting (set by :meth:`PatchHandle.begin_image`)."""

    image: Tensor | None = None
    prior_text: Tensor | None = None
    prior: Tensor | None = None
    context: ImageContext | None = None
    record: dict[str, list[Any]] = field(
        default_factory=lambda: {"windows": [], "matching": [], "matching_per_source": [], "ota_clusters": None}
    )


def cosine_logits(features: Tensor, text: Tensor) -> Tensor:
    """Cosine similarity of normalised patch features with normalised text.

    Args:
        features: (B, N, d) or (B, gh, gw, d).
        text: (Q, d), or (B, Q, d) per window (e.g. after the text adjustment).

    Returns:
        (B, Q, N) or (B, Q, gh, gw), in the promoted dtype (at least float32).
    """
    spatial = features.shape[1:-1]
    bsz, d = features.shape[0], features.shape[-1]
    if text.shape[-1] != d or text.dim() not in (2, 3) or (text.dim() == 3 and text.shape[0] not in (1, bsz)):
        raise ValueError(f"expected text (Q, d) or (B, Q, d) matching features {tuple(features.shape)}, "
                         f"got {tuple(text.shape)}")
    dtype = torch.promote_types(torch.promote_types(features.dtype, text.dtype), torch.float32)
    f_norm = F.normalize(features.to(dtype).reshape(bsz, -1, d), dim=-1)
    t_norm = F.normalize(text.to(device=features.device, dtype=dtype), dim=-1)
    if t_norm.dim() == 2:
        out = torch.einsum("bnd,qd->bqn", f_norm, t_norm)
    else:
        out = torch.einsum("bnd,bqd->bqn", f_norm, t_norm.expand(bsz, -1, -1))
    return out.reshape(bsz, t_norm.shape[-2], *spatial)


def cosine_prior(image_embedding: Tensor, text: Tensor) -> Tensor:
    """Cosine similarity of each image embedding with each query (no softmax, no temperature): the presence prior
    ``P[b, c] = cos(v_img[b], t_c)`` of CASS Eq. 8.

    Args:
        image_embedding: (B, d) or (d,).
        text: (Q, d).

    Returns:
        (B, Q) in the promoted dtype of the inputs (at least float32).
    """
    if image_embedding.dim() == 1:
        image_embedding = image_embedding.unsqueeze(0)
    if image_embedding.dim() != 2 or text.dim() != 2 or image_embedding.shape[-1] != text.shape[-1]:
        raise ValueError(f"expected image_embedding (B, d) and text (Q, d), got "
                         f"{tuple(image_embedding.shape)} and {tuple(text.shape)}")
    dtype = torch.promote_types(torch.promote_types(image_embedding.dtype, text.dtype), torch.float32)
    img = F.normalize(image_embedding.to(dtype), dim=-1)
    txt = F.normalize(text.to(device=img.device, dtype=dtype), dim=-1)
    return img @ txt.T


class PatchHandle:
    """What ``patch_clip`` returns: owns every hook handle, the plugin manager and the resolved config.

    Use as a context manager or call :meth:`remove`; afterwards the model is exactly the unpatched model.

    Attributes:
        model: the patched model.
        config: the resolved :class:`~cass_plugins.core.config.Config`.
        access: backbone access of the CLIP image tower.
        pm: the plugin manager (baseline + components); add third-party plugins with ``pm.register``.
        handles: every ``RemovableHandle`` this patch installed (timm ``FeatureHooks`` style).
        vfm: the :class:`~cass_plugins.core.vfm.VFMRunner` or ``None``.
        baseline: the baseline plugin; components: the component plugins by name.
    """

    def __init__(self, model: nn.Module, access: ViTAccess, config: Config, vfm: VFMRunner | None) -> None:
        self.model, self.access, self.config, self.vfm = model, access, config, vfm
        self.pm = make_plugin_manager()
        self.state = PatchState()
        self.handles: list[RemovableHandle] = []
        self.baseline: Any = None
        self.components: dict[str, Any] = {}
        self._image = _ImageState()
        self._removed = False

    # ------------------------------------------------------------------------------------------------ inspection
    @property
    def spectral(self) -> Any:
        """The spectral-distillation plugin, if switched on."""
        return self.components.get("spectral")

    @property
    def last_matching(self) -> list[HeadMatching]:
        """Head matching of every crop of the last forward: cost (rows VFM, columns CLIP heads), fused heads,
        pairs, fusion weights, low-rank ranks, margin (0 = tied optimum) and window index. Empty without
        spectral distillation."""
        spectral = self.spectral
        return list(spectral.last_matching) if spectral is not None else []

    @property
    def output_grid(self) -> tuple[int, int] | None:
        return self.state.output_grid

    @property
    def needs_prior(self) -> bool:
        """Whether a switched-on component reads the presence prior (OPS, OTA)."""
        return any(REGISTRY.component(name).needs_prior for name in self.config.components)

    @property
    def refines_labels(self) -> bool:
        """Whether a plugin refines the decided labels (``cass_refine_labels``, e.g. SAM refinement)."""
        return bool(self.pm.hook.cass_refine_labels.get_hookimpls())

    def reset_windows(self) -> None:
        """Start counting windows from 0 again (:meth:`begin_image` does it; per-window ``spectral.matching``
        lists and callables see the image's own window numbers)."""
        self.state.windows_seen = 0

    # ------------------------------------------------------------------------------------------------ text side
    @torch.no_grad()
    def begin_image(
        self,
        image: Tensor | None,
        text: Tensor,
        *,
        vocabulary: Any = None,
        embed_text: Any = None,
        prob_thd: float | None = None,
        prior: Tensor | None = None,
    ) -> ImageContext:
        """Start an image: reset the window count, compute the presence prior of the whole image once, and call
        every component's ``cass_begin_image``.

        Args:
            image: ``(1, 3, H, W)`` the whole image, CLIP-normalised (as the crops are); ``None`` when the crops
                themselves carry the prior (``pipeline.prior_source='crop'`` or one whole-image pass).
            text: ``(Q, d)`` query embeddings (unadjusted: the prior always uses these, docs/spec/cass.md §9).
            vocabulary: the :class:`~cass_plugins.pipeline.vocabulary.Vocabulary` (OTA caches its clusters by it).
            embed_text: ``names -> (n, d)`` text encoder for components that embed extra prompts (CDAM).
            prob_thd: the background threshold post-processing will apply (components may change it).
            prior: ``(1, Q)`` the image's presence prior computed by the caller (``cosine_prior`` of its
                unpatched image embedding and ``text``), e.g. for several images in one forward
                (:meth:`~cass_plugins.pipeline.segmenter.Segmenter.segment_many`); ``image`` is then not run.

        Returns:
            the :class:`~cass_plugins.core.hookspecs.ImageContext`; after the windows, :meth:`end_image` returns it
            with the components' changes.
        """
        self._check_active()
        self.reset_windows()
        state = _ImageState(image=image, prior_text=text)
        if prior is not None:
            if prior.dim() != 2 or tuple(prior.shape) != (1, text.shape[0]):
                raise ValueError(f"prior must be (1, Q) = (1, {text.shape[0]}) for text {tuple(text.shape)}, "
                                 f"got {tuple(prior.shape)}")
            state.prior = prior
        elif image is not None and self.needs_prior and self.config.pipeline.prior_source == "image":
            embedding = image_embedding(self.model, image)
            state.prior = _checked_prior(embedding, text, self.model)
        threshold = self.config.pipeline.prob_thd if prob_thd is None else prob_thd
        state.context = ImageContext(
            vocabulary=vocabulary, text=text, embed_text=embed_text or _no_text_encoder, prob_thd=threshold
        )
        self._image = state
        self.pm.hook.cass_begin_image(ctx=state.context)
        return state.context

    def end_image(self) -> ImageContext:
        """Call every component's ``cass_end_image`` (e.g. CDAM's per-image threshold) and return the context."""
        ctx = self._image.context
        if ctx is None:
            raise RuntimeError("end_image() without begin_image()")
        self.pm.hook.cass_end_image(ctx=ctx)
        return ctx

    @property
    def image_record(self) -> dict[str, Any]:
        """Inspection data of the current image: every window's box and head matching, the OTA clusters."""
        rec = self._image.record
        out: dict[str, Any] = {"windows": list(rec["windows"]), "matching": list(rec["matching"])}
        if rec["matching_per_source"]:
            out["matching_per_source"] = [list(m) for m in rec["matching_per_source"]]
        if rec["ota_clusters"] is not None:
            out["ota_clusters"] = rec["ota_clusters"]
        return out

    @torch.no_grad()
    def logits(
        self,
        crops: Tensor,
        text: Tensor,
        *,
        image: Tensor | None = None,
        vocabulary: Any = None,
        whole_image: bool = False,
        windows: Sequence[tuple[int, int, int, int]] | None = None,
    ) -> Tensor:
        """Per-query logits of a batch of crops with every text-side component applied.

        Runs the patched model (baseline + block components), then ``cass_adjust_text`` (OTA), the cosine logits,
        and ``cass_refine_logits`` (OPS and third-party refinements).

        The presence prior comes from the whole image, computed once per image: pass ``image=`` (the same tensor
        for every window of an image: it is recomputed only when another tensor is passed) or call
        :meth:`begin_image` first. A sliding-window segmentor therefore does::

            for image in images:
                whole = clip_normalise(resized(image))[None]
                for crop in windows_of(whole):
                    logits = handle.logits(crop, text, image=whole)

        With ``pipeline.prior_source='crop'`` each crop's own embedding is its prior, and ``whole_image=True``
        says the crops are whole images (one pass, as the VOC21 preset runs): their own embeddings are the prior.

        Args:
            crops: ``(B, 3, h, w)`` CLIP-normalised crops.
            text: ``(Q, d)`` query embeddings.
            image: the whole image the crops come from (see above).
            vocabulary: the vocabulary of ``text`` (OTA caches its clustering per vocabulary).
            whole_image: the crops are whole images.
            windows: ``(y1, y2, x1, x2)`` of each crop in the image (recorded; given to logit components).

        Returns:
            ``(B, Q, gh, gw)`` float32 logits.

        Raises:
            ValueError: a component needs the whole-image prior and no image was given.
            FloatingPointError: NaN/inf features or prior, naming whether the weights or the activations are at fault.
        """
        self._check_active()
        if image is not None and image is not self._image.image:
            self.begin_image(image, text, vocabulary=vocabulary)
        dense = encode_dense(self.model, crops)  # names the cause of any NaN/inf itself
        return self.text_logits(dense.features, text, image_embeds=dense.image_embeds, vocabulary=vocabulary,
                                whole_image=whole_image, windows=windows)

    @torch.no_grad()
    def text_logits(
        self,
        features: Tensor,
        text: Tensor,
        *,
        image_embeds: Tensor | None = None,
        vocabulary: Any = None,
        whole_image: bool = False,
        windows: Sequence[tuple[int, int, int, int]] | None = None,
        record_windows: bool = True,
    ) -> Tensor:
        """The text side of :meth:`logits` on given projected features (``cass_adjust_text``, cosine logits,
        ``cass_refine_logits``), e.g. Trident's spliced and aggregated map (docs/spec/trident.md §6).

        Args:
            features: ``(B, gh, gw, d)`` projected patch features.
            text: ``(Q, d)`` query embeddings.
            image_embeds: ``(B, d)`` the crops' own image embeddings (the prior with ``whole_image`` or
                ``prior_source='crop'``).
            vocabulary, whole_image, windows: as :meth:`logits`.
            record_windows: record ``windows`` and the last forward's head matchings in :attr:`image_record`
                (``False`` when the caller recorded the windows of the forward itself, as the splice pipeline
                does: its one map comes from many windows).
        """
        features = features.float()
        b = features.shape[0]
        prior = None
        if self.needs_prior:
            if whole_image or self.config.pipeline.prior_source == "crop":
                if image_embeds is None:
                    raise ValueError("the prior of these features needs their image embeddings: pass image_embeds=")
                prior = _checked_prior(image_embeds, text, self.model)
            elif self._image.prior is not None and self._image.prior_text is text:
                prior = self._image.prior.expand(b, -1)
            elif self._image.image is not None:
                self.begin_image(self._image.image, text, vocabulary=vocabulary)
                prior = self._image.prior.expand(b, -1)
            else:
                raise ValueError(
                    f"components {[n for n in self.config.components if REGISTRY.component(n).needs_prior]} need the "
                    "presence prior of the whole image: pass image=<the whole CLIP-normalised image> (the same "
                    "tensor for all its windows), call handle.begin_image(image, text) first, or set "
                    "prior_source='crop' to use each crop's own embedding"
                )
        tctx = TextContext(features=features, text=text[None].expand(b, -1, -1), prior=prior, vocabulary=vocabulary)
        self.pm.hook.cass_adjust_text(ctx=tctx)
        logits = cosine_logits(features, tctx.text)
        boxes = list(windows) if windows is not None else None
        lctx = LogitsContext(logits=logits, features=features, text=tctx.text, prior=prior, windows=boxes)
        self.pm.hook.cass_refine_logits(ctx=lctx)
        if record_windows:
            self.record_windows(boxes if boxes is not None else [None] * b)
        if "ota_clusters" in tctx.record:
            self._image.record["ota_clusters"] = tctx.record["ota_clusters"]
        return lctx.logits

    def record_windows(self, boxes: Sequence[tuple[int, int, int, int] | None]) -> None:
        """Record the boxes of the last forward's crops and their head matchings in :attr:`image_record`."""
        rec = self._image.record
        rec["windows"].extend(boxes)
        rec["matching"].extend(self.last_matching)
        per_source = self.state.record.get("matching_per_source")
        if per_source is not None:  # one list per graph source, each with one matching per batch row
            rec["matching_per_source"].extend(zip(*per_source))

    # ------------------------------------------------------------------------------------------------ lifecycle
    def remove(self) -> None:
        """Remove every hook and plugin; the model's outputs are bit-identical to the unpatched model's again."""
        if self._removed:
            return
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for plugin in list(self.pm.get_plugins()):
            self.pm.unregister(plugin)
        if getattr(self.access.module, _HANDLE_ATTR, None) is self:
            delattr(self.access.module, _HANDLE_ATTR)
        self.state = PatchState()
        self._image = _ImageState()
        self._removed = True

    @property
    def active(self) -> bool:
        return not self._removed

    def _check_active(self) -> None:
        if self._removed:
            raise RuntimeError("this patch was removed; patch the model again")

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def bypassed(self) -> "_Bypass":
        """Context manager running the unmodified last block (e.g. for a whole-image embedding)."""
        return _Bypass(self.state)

    def __repr__(self) -> str:
        return (
            f"PatchHandle(baseline={self.config.baseline!r}, components={list(self.config.components)}, "
            f"active={self.active})"
        )


class _Bypass:
    def __init__(self, state: PatchState) -> None:
        self.state = state

    def __enter__(self) -> None:
        self.prev, self.state.bypass = self.state.bypass, True

    def __exit__(self, *exc: object) -> None:
        self.state.bypass = self.prev


def _no_text_encoder(names: Sequence[str]) -> Tensor:
    raise RuntimeError(
        f"a component asked for the embeddings of {list(names)[:3]}...: pass embed_text= to handle.begin_image "
        "(a function names -> (n, d) embeddings), or use cass_plugins.Segmenter"
    )


def get_patch(model: nn.Module) -> PatchHandle | None:
    """The active :class:`PatchHandle` of ``model`` (or its image tower), if any."""
    try:
        module = vit_access(model).module
    except TypeError:
        return None
    return getattr(module, _HANDLE_ATTR, None)


def patch_clip(
    model: nn.Module,
    vfm: nn.Module | None = None,
    preset: str | Config = "cass-official",
    *,
    dataset: str | None = None,
    baseline: str | None = None,
    components: Iterable[str] | None = None,
    plugins: Sequence[object] = (),
    **overrides: Any,
) -> PatchHandle:
    """Patch a CLIP ViT's last block with a baseline and components.

    Args:
        model: an open_clip CLIP model, an OpenAI-clip-style model, or an image tower (also timm-based).
        vfm: the vision foundation model whose last-block keys or features a component or baseline reads (e.g.
            timm ``vit_base_patch8_224.dino``). Needed by ``spectral`` and ProxyCLIP.
        preset: a preset name (``"cass-official"`` default, ``"cass-paper"``, a baseline name) or a ``Config``.
        dataset: merge that dataset's values of the preset (docs/spec/cass.md §7).
        baseline: the last-block baseline (``"naclip"``, ``"sclip"``, ...) with its default settings.
        components: the components to switch on (``"spectral"``, ``"ops"``, ``"ota"``, ``"cdam"``, third-party
            ones); the others are switched off. ``None`` keeps the preset's.
        plugins: extra pluggy plugin objects to register (after the block components, before the text ones).
        **overrides: any configuration key (``spectral={"lowrank": "exact"}``, ``**{"ops.gamma": 0.3}``, or the
            flat keys ``lowrank=``, ``gamma=`` ...; see :mod:`cass_plugins.core.config`).

    Returns:
        a :class:`PatchHandle` (context manager, ``remove()``).

    Raises:
        RuntimeError: the model is already patched.
        TypeError: the model is not a supported ViT.
        ValueError: inconsistent configuration (e.g. spectral distillation without a VFM), before anything is
            installed.
    """
    access = vit_access(model)
    if get_patch(model) is not None:
        raise RuntimeError("this model is already patched; call remove() on its handle (or leave its `with` block) first")
    if isinstance(preset, Config) and dataset is None and baseline is None and components is None and not overrides:
        config = preset
    else:
        config = resolve_config(preset, dataset, baseline=baseline, components=components, **overrides)
    baseline_cls = REGISTRY.baseline(config.baseline)
    users = [f"component {n!r}" for n in config.components if REGISTRY.component(n).needs_vfm]
    users += [f"baseline {config.baseline!r}"] if baseline_cls.needs_vfm else []
    if users and vfm is None:
        raise ValueError(
            f"{' and '.join(users)} need{'s' if len(users) == 1 else ''} a VFM: pass vfm=<timm ViT, e.g. DINO "
            "ViT-B/8>, or switch it off"
        )
    if users:
        baseline_cls.check_vfm(vfm)
    runner = VFMRunner(vfm, **baseline_cls.vfm_input) if users else None
    handle = PatchHandle(model, access, config, runner)
    runtime = PatchRuntime(access=access, vfm=runner, state=handle.state, config=config)
    try:
        handle.baseline = baseline_cls(config.block, runtime)
        handle.pm.register(handle.baseline, name="baseline")
        # pluggy calls the last registered first: each stage is registered in reverse, so within a stage a hook
        # runs the components in registry order. Across stages a shared hook runs text components, then user
        # plugins, then block components (in practice the stages implement different hooks)
        stages = {name: REGISTRY.component(name).stage for name in config.components}
        for name in reversed([n for n in config.components if stages[n] == "block"]):
            handle.components[name] = REGISTRY.component(name).factory(config[name], runtime)
            handle.pm.register(handle.components[name], name=name)
        for i, plugin in enumerate(plugins):
            handle.pm.register(plugin, name=f"user-{i}")
        for name in reversed([n for n in config.components if stages[n] == "text"]):
            handle.components[name] = REGISTRY.component(name).factory(config[name], runtime)
            handle.pm.register(handle.components[name], name=name)
    except BaseException:
        if runner is not None:
            runner.remove()  # the VFM must not keep our pre-hook when a plugin refuses the configuration
        raise

    block_hook = LastBlockHook(access, handle.pm, handle.state)
    handle.handles.append(access.patch_embed.register_forward_pre_hook(block_hook.observe_images))
    handle.handles.append(access.last_block.register_forward_hook(block_hook))
    if runner is not None:
        handle.handles.append(runner.handle)
    setattr(access.module, _HANDLE_ATTR, handle)
    return handle


@dataclass
class DenseOutput:
    """``features`` ``(B, gh, gw, d)`` projected per-patch features; ``image_embeds`` ``(B, d)``."""

    features: Tensor
    image_embeds: Tensor


@dataclass
class DenseTokens:
    """The last block's tokens before the head: ``patches`` ``(B, gh, gw, D)`` on the output grid (the VFM grid
    for ProxyCLIP), ``prefix`` ``(B, P, D)`` the CLS (+ register) tokens."""

    patches: Tensor
    prefix: Tensor


def encode_tokens(model: nn.Module, images: Tensor) -> DenseTokens:
    """The patched last block's output tokens, before ``ln_post``/``proj``, of a batch of CLIP-normalised crops.

    What Trident splices (docs/spec/trident.md §4, P4): the window outputs are averaged and aggregated before the
    head. Same checks as :func:`encode_dense`.
    """
    handle = get_patch(model)
    access = handle.access if handle is not None else vit_access(model)
    vfm = handle.vfm if handle is not None else None
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected CLIP-normalised crops of shape (B, 3, H, W), got {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise FloatingPointError("the input crops contain NaN or inf: check the image decoding and normalisation")
    try:
        tokens, grid = access.embed(images)
        tokens = access.run_blocks(tokens, access.blocks)
    except (torch.linalg.LinAlgError, ValueError, RuntimeError) as err:
        # NaN/inf keys first surface inside the components (eigh/SVD of the spectra, the matching's solver) as a
        # LinAlgError or ValueError; name the cause. Other errors (a missing vocabulary, a refused baseline) pass.
        explained = _explain_failure(model, images, vfm, err)
        if explained is None:
            raise
        raise explained from err
    out_grid = handle.state.output_grid if handle is not None and not handle.state.bypass else None
    out_grid = out_grid or grid
    prefix, patches = tokens[:, : access.num_prefix_tokens], tokens[:, access.num_prefix_tokens:]
    if patches.shape[1] != out_grid[0] * out_grid[1]:
        raise RuntimeError(f"{patches.shape[1]} patch tokens do not fill the output grid {out_grid}")
    return DenseTokens(patches.reshape(patches.shape[0], *out_grid, -1), prefix)


def encode_dense(model: nn.Module, images: Tensor) -> DenseOutput:
    """Projected per-patch features and image embeddings of a batch of CLIP-normalised crops.

    Works on patched and unpatched models; the positional embedding is interpolated to any grid (the "+0.1"
    rule, docs/spec/baselines.md §2). For an unpatched model the features are vanilla CLIP's last-block tokens.

    Raises:
        FloatingPointError: NaN/inf in the input crops, or arising in the forward (CLIP, the VFM of a patched
            model, or their activations), named by :func:`non_finite_message`; never NaN features returned
            silently, nor a bare solver error for NaN keys.
    """
    handle = get_patch(model)
    access = handle.access if handle is not None else vit_access(model)
    vfm = handle.vfm if handle is not None else None
    tokens = encode_tokens(model, images)
    b, gh, gw, width = tokens.patches.shape
    projected = access.head(torch.cat([tokens.prefix, tokens.patches.reshape(b, gh * gw, width)], dim=1))
    patches = projected[:, access.num_prefix_tokens:]
    # One reduction over the outputs (cheap next to the forward); the parameters are scanned only when it fails.
    if not torch.isfinite(patches).all():
        raise FloatingPointError(non_finite_message("the CLIP patch features", model, vfm))
    if not torch.isfinite(projected[:, 0]).all():
        raise FloatingPointError(non_finite_message("the CLIP image embedding (CLS token)", model, vfm))
    return DenseOutput(patches.reshape(b, gh, gw, -1), projected[:, 0])


def image_embedding(model: nn.Module, images: Tensor) -> Tensor:
    """The unmodified model's image embedding ``(B, d)`` (CLS → ln_post → proj) at any input size."""
    handle = get_patch(model)
    if handle is None:
        return encode_dense(model, images).image_embeds
    with handle.bypassed():
        return encode_dense(model, images).image_embeds


# ---------------------------------------------------------------------------------------------- NaN diagnostics
def non_finite_parameters(clip_model: nn.Module, vfm: Any) -> list[str]:
    """``"CLIP parameters [names]"`` / ``"VFM parameters [names]"`` for each model holding NaN/inf weights."""
    culprits = []
    vfm_model = getattr(vfm, "model", vfm)
    for label, model in (("CLIP", clip_model), ("VFM", vfm_model)):
        if model is None:
            continue
        bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            culprits.append(f"{label} parameters {bad[:5]}{' ...' if len(bad) > 5 else ''}")
    return culprits


def non_finite_message(where: str, clip_model: nn.Module, vfm: Any) -> str:
    """Name the model(s) whose parameters hold NaN/inf, or say that the activations overflowed."""
    culprits = non_finite_parameters(clip_model, vfm)
    cause = (
        "NaN/inf in the " + " and ".join(culprits) + ": the checkpoint is corrupt or was loaded incompletely"
        if culprits else "no parameter is NaN/inf, so the activations overflowed: run the models in float32"
    )
    return f"NaN or inf in {where} ({cause})"


def _explain_failure(model: nn.Module, images: Tensor, vfm: Any, err: Exception) -> FloatingPointError | None:
    """The FloatingPointError that names why the patched forward failed on ``images``, or None when no NaN/inf
    is behind ``err``.

    Runs only after a failure: scans the parameters of CLIP and the VFM; with finite parameters, reruns the unpatched
    CLIP forward and the VFM keys to see whether the activations overflowed (fp16) and in which model.
    """
    if non_finite_parameters(model, vfm):
        return FloatingPointError(non_finite_message("the forward of the patched model", model, vfm))
    overflowed = []
    handle = get_patch(model)
    try:
        with torch.no_grad():
            if handle is not None and not handle.state.bypass:
                with handle.bypassed():
                    clip_out = encode_dense(model, images)
                if not torch.isfinite(clip_out.features).all():
                    overflowed.append("CLIP")
            if vfm is not None and hasattr(vfm, "keys") and not torch.isfinite(vfm.keys(images)[0]).all():
                overflowed.append("VFM")
    except FloatingPointError:
        overflowed.append("CLIP")  # the unpatched forward itself produced NaN/inf
    except Exception:  # the probe is best effort: a probe that fails says nothing about the cause
        pass
    if not overflowed and not isinstance(err, torch.linalg.LinAlgError):
        return None
    where = f"the {' and '.join(overflowed)} activations" if overflowed else "the attention keys"
    return FloatingPointError(non_finite_message(where, model, vfm))


def _checked_prior(image_embeds: Tensor, text: Tensor, model: nn.Module) -> Tensor:
    prior = cosine_prior(image_embeds.float(), text.to(image_embeds.device))
    if not torch.isfinite(prior).all():
        raise FloatingPointError(non_finite_message("the CLIP image embedding of the presence prior", model, None))
    return prior
