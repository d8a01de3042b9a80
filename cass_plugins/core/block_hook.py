"""The forward hook on the CLIP tower's last block: runs the plugin chain (baseline graphs → component refinements →
baseline output) and replaces the patch rows of the block's output."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pluggy
import torch
from torch import Tensor, nn

from cass_plugins.backbone.access import ViTAccess
from .hookspecs import BlockContext


__all__ = ["PatchState", "LastBlockHook"]


@dataclass
class PatchState:
    """Mutable per-forward state shared by the hooks of one patch."""

    images: Tensor | None = None  # crops seen by the patch embedding (CLIP-normalised)
    grid: tuple[int, int] | None = None
    output_grid: tuple[int, int] | None = None
    bypass: bool = False  # run the unmodified block (used for whole-image embeddings)
    record: dict[str, Any] = field(default_factory=dict)
    windows_seen: int = 0  # crops through the patched block since the last reset: the next crop's window index


class LastBlockHook:
    """Forward hook on the CLIP tower's last block: replaces the patch rows of its output.

    Prefix rows (CLS) keep the unmodified block's output, so the pooled image embedding of the patched model is
    the original one (cass.md §1).
    """

    def __init__(self, access: ViTAccess, pm: pluggy.PluginManager, state: PatchState) -> None:
        self.access, self.pm, self.state = access, pm, state

    def observe_images(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        images = args[0]
        self.state.images = images
        self.state.grid = self.access.grid_for(images.shape[-2], images.shape[-1])

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
        if self.state.bypass:
            return None
        acc = self.access
        x = acc.to_batch_first(args[0])
        out = acc.to_batch_first(output)
        grid = self._grid(x.shape[1] - acc.num_prefix_tokens)
        q, k, v = acc.qkv(x)
        images = self.state.images if self.state.images is not None and self.state.images.shape[0] == x.shape[0] else None
        first = self.state.windows_seen
        self.state.windows_seen += x.shape[0]
        ctx = BlockContext(
            access=acc, x=x, block_output=out, q=q, k=k, v=v, grid=grid, images=images,
            window_indices=list(range(first, first + x.shape[0])),
        )
        graphs = self.pm.hook.cass_attention_graphs(ctx=ctx)
        if graphs is None:
            raise RuntimeError("no baseline plugin produced attention graphs; register one (e.g. adapters.NACLIP)")
        ctx.graphs = list(graphs)
        self.pm.hook.cass_refine_graphs(ctx=ctx)
        patch = self.pm.hook.cass_block_output(ctx=ctx)
        ctx.patch_output = patch
        self.state.output_grid = ctx.output_grid or grid
        self.state.record = ctx.record
        new = torch.cat([out[:, : acc.num_prefix_tokens], patch.to(out.dtype)], dim=1)
        return acc.from_batch_first(new)

    def _grid(self, num_patches: int) -> tuple[int, int]:
        grid = self.state.grid
        if grid is not None and grid[0] * grid[1] == num_patches:
            return grid
        side = int(round(num_patches ** 0.5))
        if side * side != num_patches:
            raise RuntimeError(
                f"cannot infer the patch grid of {num_patches} tokens; run the model through its patch embedding "
                "(model.encode_image / cass_plugins.encode_dense) so the hook sees the image size"
            )
        return side, side
