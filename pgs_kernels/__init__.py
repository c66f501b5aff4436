"""pgs-kernels: fused CLIP-PGS patch selection for PyTorch.

>>> import torch, pgs_kernels
>>> images = torch.randn(8, 3, 224, 224)
>>> sel = pgs_kernels.pgs_select(images, mask_ratio=0.5)
>>> sel.keep_idx.shape
torch.Size([8, 98])
"""

from .api import pgs_select
from .backends import available_backends, resolve_backend
from .contract import PGSSelection, pgs_counts
from .dropout import PGSPatchDropout
from .integrations import PGSDropoutSlot, remove_pgs, set_pgs_epoch, use_pgs
from .op import NATIVE_AVAILABLE, SCHEMA, TRITON_AVAILABLE

__version__ = "0.1.0"

__all__ = [
    "pgs_select",
    "PGSSelection",
    "PGSPatchDropout",
    "use_pgs",
    "remove_pgs",
    "set_pgs_epoch",
    "PGSDropoutSlot",
    "available_backends",
    "resolve_backend",
    "pgs_counts",
    "NATIVE_AVAILABLE",
    "TRITON_AVAILABLE",
    "SCHEMA",
]
