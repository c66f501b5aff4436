"""Shared fixtures. Without a GPU, Triton kernels run through the interpreter
on CPU tensors; the variable must be set before Triton decorates a kernel,
i.e. before pgs_kernels is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import pgs_kernels  # noqa: E402
import python_ref  # noqa: E402
from pgs_kernels import pgs_counts, samples  # noqa: E402
from python_ref.compare import compare_with_reference, selection_errors  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

PHOTO_NAMES = samples.PHOTO_NAMES[:5]  # astronaut, coffee, chelsea, rocket, camera


def load_photo(name: str, size=(224, 224)) -> torch.Tensor:
    """A scikit-image sample photo as a (3, H, W) float32 tensor, centre-cropped
    to the aspect of ``size``, resized by area and standardized per channel
    (mean 0, std 1) like a CLIP input."""
    return samples.standardize(samples.photo(name, size))


@pytest.fixture(scope="session")
def photos() -> torch.Tensor:
    """Five real photos, (5, 3, 224, 224) float32."""
    return torch.stack([load_photo(n) for n in PHOTO_NAMES])


def smooth_images(B, C, H, W, seed, dtype=torch.float32):
    """Random images with structure at several scales, so that patches are
    neither all alike nor all unrelated (and the r > θ tier is populated)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(B, C, H, W)
    for cells in (2, 4, 8):
        lo = torch.randn(B, C, cells, cells, generator=g)
        x += torch.nn.functional.interpolate(lo, size=(H, W), mode="bilinear", align_corners=False)
    x += 0.3 * torch.randn(B, C, H, W, generator=g)
    return x.to(dtype)


def patch_tokens(images, P, D, seed, dtype=torch.float32):
    """Tokens that are a fixed random projection of the patch pixels (like a
    patch embedding) plus noise, on ``images``' device."""
    g = torch.Generator().manual_seed(seed + 1000)
    x = python_ref.patchify(images.float().cpu(), P)
    proj = torch.randn(x.shape[2], D, generator=g) / x.shape[2] ** 0.5
    t = x @ proj + 0.5 * torch.randn(x.shape[0], x.shape[1], D, generator=g)
    return t.to(dtype).to(images.device)


def assert_valid_selection(sel, B: int, L: int, K: int):
    """The invariants every output must meet, NaN inputs included."""
    errors = selection_errors(sel, B, L, K)
    assert not errors, "; ".join(errors)


def assert_matches_reference(backend, images, tokens=None, noise=None, *, min_decided=0.5, tol=1e-4, **kw):
    """Run ``backend`` and the fp64 reference on the same inputs and hold the
    backend to the contract (python_ref/compare.py): invariants, ``edge`` and
    ``redundancy`` within ``tol``, candidates and selections equal on every
    decided row, and at least ``min_decided`` of the rows decided, so that the
    exact comparison is never vacuous. Returns the backend's selection."""
    B, _, H, W = images.shape
    P = kw.get("patch_size", 16)
    L = (H // P) * (W // P)
    K, _, k = pgs_counts(L, kw.get("mask_ratio", 0.5), kw.get("candidate_ratio", 0.05))
    if noise is None:
        noise = torch.rand(B, L, generator=torch.Generator().manual_seed(B * 1000 + L)).to(images.device)
    tw = kw.get("token_weight", 0.0)
    got = pgs_kernels.pgs_select(images, tokens, noise=noise, backend=backend, return_scores=True, **kw)
    assert got.edge.dtype == torch.float32 and got.redundancy.dtype == torch.float32
    assert tuple(got.candidates.shape) == (B, k) and got.candidates.dtype == torch.int64
    # The backend reads low-precision inputs as they are: the reference sees the same values.
    ref_tokens = tokens.double() if (tokens is not None and tw > 0) else None
    ref = python_ref.pgs_select(images.double(), ref_tokens, noise=noise, return_scores=True, **kw)
    energy = python_ref.patch_sobel_energy(images.double(), P)
    res = compare_with_reference(got, ref, noise, edge_weight=kw.get("edge_weight", 1.0), num_keep=K,
                                 sim_threshold=kw.get("sim_threshold", 0.5), tol=tol, energy=energy)
    assert not res.problems, f"{backend}: " + "; ".join(res.problems)
    if k == 0:
        assert torch.isneginf(got.redundancy).all()
    share = res.decided.float().mean().item() if B else 1.0
    assert share >= min_decided, f"only {int(res.decided.sum())}/{B} rows decided: the comparison says little"
    return got
