"""Shared fixtures. Without a GPU, Triton kernels run through the interpreter
on CPU tensors; the variable must be set before Triton decorates a kernel,
i.e. before pgs_kernels is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from pgs_kernels import samples  # noqa: E402

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


def assert_valid_selection(sel, B: int, L: int, K: int):
    """The invariants every output must meet, NaN inputs included."""
    keep, mask = sel.keep_idx, sel.mask
    assert keep.dtype == torch.int64 and tuple(keep.shape) == (B, K)
    assert mask.dtype == torch.bool and tuple(mask.shape) == (B, L)
    if B == 0:
        return
    keep_c, mask_c = keep.cpu(), mask.cpu()
    assert (keep_c >= 0).all() and (keep_c < L).all()
    if K > 1:
        assert (keep_c[:, 1:] > keep_c[:, :-1]).all(), "keep_idx must be strictly ascending (distinct)"
    expect = torch.ones(B, L, dtype=torch.bool)
    expect.scatter_(1, keep_c, False)
    assert torch.equal(mask_c, expect), "mask must be the complement of keep_idx"
    assert (mask_c.sum(1) == L - K).all()


def _gap_at(values: torch.Tensor, n: int) -> torch.Tensor:
    """Per row, the gap between the n-th and (n+1)-th smallest value."""
    B, L = values.shape
    if n <= 0 or n >= L:
        return torch.full((B,), float("inf"), dtype=torch.float64)
    s = torch.sort(values, dim=1).values
    return s[:, n] - s[:, n - 1]


def stable_rows(ref, noise, edge_weight: float, K: int, sim_threshold: float, tol: float = 1e-4):
    """Rows of a batch where a selection is decided by more than ``tol``.

    ``ref`` is a reference PGSSelection with scores (fp64), ``noise`` the noise
    both backends used. A row is stable when no candidate-cut, threshold or
    drop-cut decision lies within ``tol`` of flipping; on those rows every
    backend must give exactly the reference's selection, on the others only
    the invariants are asserted.
    """
    edge = ref.edge.double().cpu()
    key = noise.double().cpu() + (edge_weight * edge if edge_weight else 0.0)
    key = torch.nan_to_num(key, nan=1e5, posinf=1e5)
    B, L = key.shape
    k = ref.candidates.shape[1]
    ok = _gap_at(key, k) > tol
    r = ref.redundancy.double().cpu()
    ok &= ~((r - sim_threshold).abs() <= tol).any(dim=1)
    tier = torch.full((B, L), 2.0, dtype=torch.float64)
    tier[r > sim_threshold] = 1.0
    tier.scatter_(1, ref.candidates.cpu(), 0.0)
    ok &= _gap_at(tier * 1e6 + key, L - K) > tol
    return ok
