"""Every backend usable here against the fp64 reference, through one helper
(``assert_matches_reference``): the same cases for the native kernel, the
Triton kernel (compiled on CUDA, interpreted on CPU: the cases stay small) and
the reference backend itself (fp32 against fp64), plus the backend table.

The per-backend files (test_native.py, test_triton.py) add what only that
backend has: layouts and threads, tile paths, compilation.
"""

from unittest import mock

import pytest
import torch

import pgs_kernels
from conftest import DEVICE, assert_matches_reference, patch_tokens, smooth_images
from pgs_kernels import resolve_backend

BACKENDS = pgs_kernels.available_backends(DEVICE)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# (seed, B, C, H, W, P, images dtype, tokens dtype or None, options)
CASES = [
    (0, 3, 3, 32, 48, 8, "fp32", None, {}),
    (1, 2, 3, 28, 42, 14, "fp32", "fp32", dict(token_weight=0.5)),
    (2, 2, 1, 48, 32, 16, "fp32", None, dict(mask_ratio=0.3)),
    (3, 1, 3, 64, 96, 32, "fp32", "bf16", dict(token_weight=0.5, candidate_ratio=0.5)),
    (4, 4, 3, 32, 32, 8, "bf16", "bf16", dict(token_weight=0.3, candidate_ratio=0.1)),
    (5, 2, 1, 32, 32, 16, "fp16", "fp16", dict(token_weight=1.0, candidate_ratio=0.25)),
    (6, 2, 3, 56, 28, 14, "fp32", None, dict(use_ot=False, candidate_ratio=0.2)),
    (7, 2, 3, 32, 48, 8, "fp32", None, dict(candidate_ratio=0.0)),
    (8, 2, 3, 32, 48, 8, "fp32", "fp32", dict(token_weight=0.4, edge_weight=0.0, sim_threshold=0.2)),
    (9, 1, 3, 64, 32, 16, "bf16", None, dict(mask_ratio=0.75, ot_reg=0.2, ot_iters=5)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[f"case{c[0]}" for c in CASES])
def test_random_inputs_match_reference(backend, case):
    seed, B, C, H, W, P, idt, tdt, opts = case
    images = smooth_images(B, C, H, W, seed).to(DTYPES[idt]).to(DEVICE)
    tokens = patch_tokens(images, P, 24, seed, DTYPES[tdt]) if tdt else None
    assert_matches_reference(backend, images, tokens, patch_size=P, **opts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_photos_match_reference(backend, photos):
    # The interpreter gets a quarter-size crop of each photo; the others the real size.
    imgs = photos if (backend != "triton" or DEVICE == "cuda") else photos[:, :, :96, :64].contiguous()
    imgs = imgs.to(DEVICE)
    P = 16 if imgs.shape[-1] >= 128 else 8
    for opts in (dict(), dict(mask_ratio=0.75, edge_weight=2.0), dict(use_ot=False, candidate_ratio=0.1)):
        assert_matches_reference(backend, imgs, patch_size=P, min_decided=0.6, **opts)


def test_auto_is_the_operator_and_names_its_kernel():
    """"auto" runs the operator, the one per-device dispatch: native on CPU where
    it is built, Triton on CUDA where it imports, the reference anywhere else."""
    from pgs_kernels import op

    assert resolve_backend("auto", "cpu").name == ("native" if op.NATIVE_AVAILABLE else "reference")
    assert resolve_backend("auto", "cuda").name == ("triton" if op.TRITON_AVAILABLE else "reference")
    assert resolve_backend("auto", "xpu").name == "reference"
    images = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 4)
    with mock.patch.object(op, "pgs_select_op", wraps=op.pgs_select_op) as operator:
        pgs_kernels.pgs_select(images, noise=noise, patch_size=16)
        assert operator.call_count == 1
        if "native" in pgs_kernels.available_backends("cpu"):
            pgs_kernels.pgs_select(images, noise=noise, patch_size=16, backend="native")
            assert operator.call_count == 2
        pgs_kernels.pgs_select(images, noise=noise, patch_size=16, backend="reference")  # the oracle, directly
        assert operator.call_count in (1, 2)


def test_resolver_names_backend_and_says_why():
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("gpu", "cpu")
    with pytest.raises(TypeError, match="backend must be a str"):
        resolve_backend(None, "cpu")
    with pytest.raises(ValueError, match="backend='native' is not available for meta tensors: needs CPU"):
        resolve_backend("native", "meta")
    assert resolve_backend("reference", "cpu").name == "reference"


# --- the numerical range: agree up to 1e15, fail as the fp32 reference does past fp32's overflow


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C", [3, 64])
def test_large_pixels_within_range_match_reference(backend, C):
    images = (smooth_images(2, C, 32, 32, 40 + C) * 1e15).to(DEVICE)
    assert_matches_reference(backend, images, patch_size=8, candidate_ratio=0.25)
    tokens = patch_tokens(images / 1e15, 8, 16, 41) * (1e15 / 16)  # norms near 1e15
    assert_matches_reference(backend, images, tokens, patch_size=8, candidate_ratio=0.25, token_weight=0.5)


def _fp32_reference(images, tokens, noise, **kw):
    import python_ref

    t = tokens.float() if tokens is not None else None
    return python_ref.pgs_select(images.float(), t, noise=noise, dtype=torch.float32, return_scores=True, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale,token_norm", [(1e20, None), (1e30, None), (1.0, 1e21), (1e20, 1e25)])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the overflow is the point
def test_past_fp32_overflow_fails_like_the_fp32_reference(backend, scale, token_norm):
    """Edge rows that overflow give NaN edges (candidates by index), vectors
    whose norms overflow count as zero vectors (similarity 0, not NaN): the
    same outcome in every backend. θ < 0 makes a zero similarity (tier 1)
    and a NaN one (tier 2) select differently."""
    C = 3
    images = (smooth_images(2, C, 32, 32, 43) * scale).to(DEVICE)
    tokens = None
    kw = dict(patch_size=8, candidate_ratio=0.25, sim_threshold=-0.5)
    if token_norm is not None:
        tokens = (patch_tokens(images / scale, 8, 16, 44) * (token_norm / 16)).to(DEVICE)
        kw["token_weight"] = 0.5
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(45)).to(DEVICE)
    got = pgs_kernels.pgs_select(images, tokens, noise=noise, backend=backend, return_scores=True, **kw)
    ref = _fp32_reference(images.cpu(), None if tokens is None else tokens.cpu(), noise.cpu(), **kw)
    assert torch.equal(torch.isnan(got.edge.cpu()), torch.isnan(ref.edge))
    assert torch.equal(got.candidates.cpu(), ref.candidates)
    assert torch.equal(torch.isnan(got.redundancy.cpu()), torch.isnan(ref.redundancy))
    assert torch.equal(got.keep_idx.cpu(), ref.keep_idx)
