"""Pure-PyTorch reference of PGS selection (the oracle of every test) and the
baselines it is measured against: the published algorithm and random masking.

It shares the contract (result type, counts, checks, noise) with the package,
from ``pgs_kernels.contract``; the package loads it only when the reference
backend runs.

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

__all__ = [
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
