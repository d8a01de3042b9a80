"""Object-guided text embedding adjustment (OTA, cass.md §4, §9).

Once per vocabulary the query embeddings are grouped by Ward clustering on cosine distances. Then, per window,
the most present query of every cluster (highest presence prior) is pulled towards the mean of the window's
top-n patches that best match it.
"""
from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Hashable

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cass_plugins.core.hookspecs import TextContext, hookimpl
from cass_plugins.core.patch import cosine_logits
from cass_plugins.core.settings import Settings, setting

__all__ = ["TextEmbeddingAdjuster", "OTAConfig", "TextAdjusterPlugin", "OTA_LEGACY_KEYS"]


@dataclass(frozen=True)
class OTAConfig(Settings):
    """Settings of the object-guided text adjustment (``ota``); per-dataset values in docs/spec/cass.md §7."""

    alpha: float = setting(0.02, range=(0.0, 1.0), doc="step of the adjusted query toward its top patches")
    h_threshold: float = setting(0.1, range=(0.0, None), doc="Ward cut height of the query clustering")
    top_n: int = setting(2, range=(1, None), doc="patches averaged per cluster")


#: Flat keys of versions before 0.2.
OTA_LEGACY_KEYS = {"alpha": "alpha", "h_threshold": "h_threshold", "top_n": "top_n"}


class TextEmbeddingAdjuster:
    """OTA: Ward clustering of the queries and per-window adjustment of one query per cluster.

    Args:
        alpha: step towards the patch mean, in [0, 1]; 0 leaves the text embeddings unchanged.
        h_threshold: Ward cut height (``fcluster(t=h_threshold, criterion='distance')``), >= 0.
        top_n: patches averaged per cluster.
        max_cached: clusterings kept (one per vocabulary).
    """

    def __init__(self, alpha: float, h_threshold: float, top_n: int = 2, max_cached: int = 32) -> None:
        alpha, h_threshold = float(alpha), float(h_threshold)
        if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not (math.isfinite(h_threshold) and h_threshold >= 0.0):
            raise ValueError(f"h_threshold must be a finite number >= 0, got {h_threshold}")
        if int(top_n) != top_n or top_n < 1:
            raise ValueError(f"top_n must be a positive integer, got {top_n}")
        self.alpha = alpha
        self.h_threshold = h_threshold
        self.top_n = int(top_n)
        self.max_cached = max_cached
        self._clusters: OrderedDict[Hashable, torch.Tensor] = OrderedDict()

    def __repr__(self) -> str:
        return f"TextEmbeddingAdjuster(alpha={self.alpha}, h_threshold={self.h_threshold}, top_n={self.top_n})"

    # ------------------------------------------------------------------ clustering
    def cluster(self, text: torch.Tensor, key: Hashable | None = None) -> torch.LongTensor:
        """Flat Ward clusters of the query embeddings (computed once per vocabulary, then cached).

        Float64 throughout: sklearn ``cosine_distances`` (clipped to [0, 2], zero diagonal) → scipy
        ``squareform(checks=False)`` → ``linkage(method='ward')`` → ``fcluster(t=h_threshold,
        criterion='distance')``. A single query is one cluster.

        Args:
            text: (Q, d) query embeddings.
            key: cache key; default: a hash of the tensor's values and shape.

        Returns:
            LongTensor (Q,) on ``text.device``: cluster ids, scipy's fcluster labels minus 1 (so 0-based).
        """
        from scipy.cluster.hierarchy import fcluster, linkage
        from scipy.spatial.distance import squareform
        from sklearn.metrics.pairwise import cosine_distances

        if text.dim() != 2 or text.shape[0] == 0:
            raise ValueError(f"expected text of shape (Q, d) with Q >= 1, got {tuple(text.shape)}")
        x = text.detach().to("cpu", torch.float64).contiguous().numpy()
        if key is None:
            key = ("sha1", x.shape, hashlib.sha1(x.tobytes()).hexdigest())
        key = (key, self.h_threshold)
        hit = self._clusters.get(key)
        if hit is not None:
            self._clusters.move_to_end(key)
            return hit.to(text.device)

        if x.shape[0] == 1:
            labels = np.zeros(1, dtype=np.int64)
        else:
            dist = cosine_distances(x)
            z = linkage(squareform(dist, checks=False), method="ward")
            labels = fcluster(z, t=self.h_threshold, criterion="distance").astype(np.int64) - 1
        ids = torch.from_numpy(labels)
        self._clusters[key] = ids
        while len(self._clusters) > self.max_cached:
            self._clusters.popitem(last=False)
        return ids.to(text.device)

    # ------------------------------------------------------------------ adjustment
    def adjust(self, features: torch.Tensor, text: torch.Tensor, prior: torch.Tensor,
               clusters: torch.Tensor | None = None) -> torch.Tensor:
        """Per-window adjusted text embeddings.

        For every window b and every cluster (singletons too): c* = argmax of ``prior[b]`` over the cluster's
        members (ties → lowest query index); t = text[c*]; μ = normalise(mean of the top-n normalised patch
        features by cosine with t); text[c*] ← normalise((1 − α)·t + α·μ). The other members stay unchanged.

        Args:
            features: (B, N, d) or (B, gh, gw, d) patch features of each window (normalised here).
            text: (Q, d) query embeddings, expected L2-normalised (as :func:`encode_text` returns); t is used as
                given in the blend.
            prior: (B, Q) presence prior computed with the UNADJUSTED text (or (1, Q)/(Q,), broadcast).
            clusters: (Q,) cluster ids (any integers); default: :meth:`cluster` of ``text``.

        Returns:
            (B, Q, d) in the promoted dtype of features and text (at least float32). With α = 0, ``text``
            expanded to (B, Q, d) without any arithmetic.
        """
        if features.dim() == 4:
            features = features.flatten(1, 2)
        if features.dim() != 3 or text.dim() != 2 or features.shape[-1] != text.shape[-1]:
            raise ValueError(f"expected features (B, N, d) or (B, gh, gw, d) and text (Q, d), got "
                             f"{tuple(features.shape)} and {tuple(text.shape)}")
        b, n, d = features.shape
        q = text.shape[0]
        if prior.dim() == 1:
            prior = prior.unsqueeze(0)
        if prior.dim() != 2 or prior.shape[1] != q or prior.shape[0] not in (1, b):
            raise ValueError(f"expected prior (B, Q) = ({b}, {q}), got {tuple(prior.shape)}")
        if self.alpha == 0.0:
            return text.unsqueeze(0).expand(b, q, d)
        if clusters is None:
            clusters = self.cluster(text)
        clusters = torch.as_tensor(clusters, device=text.device).reshape(-1)
        if clusters.shape[0] != q:
            raise ValueError(f"clusters must have one id per query ({q}), got {clusters.shape[0]}")

        dtype = torch.promote_types(torch.promote_types(features.dtype, text.dtype), torch.float32)
        device = features.device
        f_norm = F.normalize(features.to(dtype), dim=-1)
        text = text.to(device=device, dtype=dtype)
        prior = prior.to(device=device, dtype=dtype).expand(b, q)
        _, ids = torch.unique(clusters.to(device), return_inverse=True)  # contiguous 0..K-1
        k = int(ids.max()) + 1

        # Segment argmax: mask the prior to each cluster's members; argmax returns the FIRST maximal index.
        # Members are clamped to a finite floor so that a member at -inf still beats the masked-out entries.
        member = ids.unsqueeze(0) == torch.arange(k, device=device).unsqueeze(1)  # (K, Q)
        floor = torch.finfo(dtype).min
        masked = torch.where(member.unsqueeze(0), prior.clamp_min(floor).unsqueeze(1),
                             torch.full((), -math.inf, dtype=dtype, device=device))
        best = masked.argmax(dim=-1)  # (B, K)

        t = text[best]  # (B, K, d)
        sim = torch.einsum("bnd,bkd->bkn", f_norm, F.normalize(t, dim=-1))
        top = sim.topk(min(self.top_n, n), dim=-1).indices  # (B, K, n)
        picked = torch.gather(f_norm.unsqueeze(1).expand(b, k, n, d), 2,
                              top.unsqueeze(-1).expand(-1, -1, -1, d))  # (B, K, top_n, d)
        mu = F.normalize(picked.mean(dim=2), dim=-1)
        new = F.normalize((1.0 - self.alpha) * t + self.alpha * mu, dim=-1)

        # Clusters are disjoint, so the scatter targets are distinct.
        out = text.unsqueeze(0).expand(b, q, d).clone()
        out.scatter_(1, best.unsqueeze(-1).expand(-1, -1, d), new)
        return out

    @staticmethod
    def logits(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of normalised patch features with normalised text
        (:func:`~cass_plugins.core.patch.cosine_logits`)."""
        return cosine_logits(features, text)


class TextAdjusterPlugin:
    """OTA as a component (``components=["ota"]``): per-window text adjustment toward the top patches."""

    def __init__(self, config: OTAConfig, runtime: Any = None) -> None:
        self.config = config
        self.adjuster = TextEmbeddingAdjuster(config.alpha, config.h_threshold, config.top_n)

    @hookimpl
    def cass_adjust_text(self, ctx: TextContext) -> None:
        if ctx.prior is None:
            raise RuntimeError("the presence prior was not computed; run through PatchHandle.logits or a Segmenter")
        base = ctx.text[0] if ctx.text.dim() == 3 else ctx.text
        clusters = self.adjuster.cluster(base, key=ctx.vocabulary.queries if ctx.vocabulary is not None else None)
        ctx.text = self.adjuster.adjust(ctx.features, base, ctx.prior, clusters)
        names = ctx.vocabulary.queries if ctx.vocabulary is not None else [str(i) for i in range(base.shape[0])]
        groups: dict[int, list[str]] = {}
        for query, label in zip(names, clusters.tolist()):
            groups.setdefault(label, []).append(query)
        ctx.record["ota_clusters"] = [tuple(groups[k]) for k in sorted(groups)]
