"""Pure-PyTorch reference of PGS selection (the oracle of every test) and the
baselines it is measured against: the published algorithm and random masking.

>>> from python_ref import pgs_select, published_pgs, random_masking
"""

from .pgs import (
    candidate_similarity,
    edge_energy,
    generate_candidates,
    patch_sobel_energy,
    patchify,
    pgs_select,
    pgs_select_core,
    redundancy,
    select_patches,
    sinkhorn_plan,
)
from .published import published_pgs, random_masking, sinkhorn_knopp_division
from .selection import IMAGE_DTYPES, PGSSelection, check_pgs_args, draw_noise, pgs_counts

__all__ = [
    "PGSSelection",
    "pgs_counts",
    "check_pgs_args",
    "draw_noise",
    "IMAGE_DTYPES",
    "pgs_select",
    "pgs_select_core",
    "published_pgs",
    "random_masking",
    "edge_energy",
    "patch_sobel_energy",
    "generate_candidates",
    "candidate_similarity",
    "sinkhorn_plan",
    "redundancy",
    "select_patches",
    "patchify",
    "sinkhorn_knopp_division",
]
