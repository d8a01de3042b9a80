"""Everything that knows model internals: reading q/k/v, the out-projection, the head and the positional
embeddings of open_clip, OpenAI-clip-style and timm ViTs (:mod:`.access`), and loading checkpoints (:mod:`.loading`)."""
from .access import ViTAccess, vit_access

__all__ = ["ViTAccess", "vit_access"]
