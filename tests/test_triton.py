"""What only the fused Triton kernel has: its tile paths (forced through
monkeypatched tile sizes), the batch-stride loop, its patch limit, its
argument order, and on CUDA torch.compile, CUDA graphs and a ViT-B/16 batch.

Without CUDA the kernel runs in the Triton interpreter on CPU tensors
(conftest sets ``TRITON_INTERPRET=1``), so the shapes here are small; the
CUDA-only tests skip. Its agreement with the fp64 reference (every case,
dtype, token mode, layout, photo and the numerical range) is the shared
table's, test_agreement.py, as for every backend.
"""

import pytest
import torch

import pgs_kernels
import python_ref
from conftest import DEVICE, assert_matches_reference, make_inputs
from pgs_kernels import triton_pgs

pytestmark = pytest.mark.skipif(
    "triton" not in pgs_kernels.available_backends(DEVICE),
    reason="Triton is not usable here (needs CUDA or TRITON_INTERPRET=1)",
)
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _check(images, tokens, noise, **kw):
    """The kernel against the fp64 reference (conftest.assert_matches_reference)."""
    got = assert_matches_reference("triton", images, tokens, noise, **kw)
    assert got.candidates.is_contiguous()
    return got


def test_multi_block_candidates(monkeypatch):
    """S through scratch in several candidate blocks (the large-k path)."""
    monkeypatch.setattr(triton_pgs, "_S_TILE", 16)
    images, tokens, noise = make_inputs(25, 2, 3, 48, 48, 8, tokens="fp32")
    for use_ot in (True, False):
        _check(images, tokens, noise, patch_size=8, token_weight=0.4, candidate_ratio=0.6, mask_ratio=0.7,
               use_ot=use_ot)


def test_similarity_in_several_blocks(monkeypatch):
    """Small similarity tiles: S comes in blocks of 16 patches, gathered into
    one register tile for Sinkhorn (or streamed, with the S tile small too)."""
    monkeypatch.setattr(triton_pgs, "_SIM_TILE", 256)
    images, tokens, noise = make_inputs(27, 2, 3, 32, 48, 8, tokens="fp32")
    for kw in (dict(token_weight=0.5), dict(), dict(use_ot=False, token_weight=0.3)):
        _check(images, tokens, noise, patch_size=8, candidate_ratio=0.2, **kw)
    monkeypatch.setattr(triton_pgs, "_S_TILE", 256)
    _check(images, tokens, noise, patch_size=8, candidate_ratio=0.2, token_weight=0.5)


def test_batch_stride_loop(monkeypatch):
    """A tiny scratch budget: one program walks the whole batch."""
    monkeypatch.setattr(triton_pgs, "_SCRATCH_BUDGET", 1)
    images, tokens, noise = make_inputs(26, 3, 3, 32, 48, 8, tokens="fp32")
    _check(images, tokens, noise, patch_size=8, token_weight=0.5, candidate_ratio=0.1)


def test_too_many_patches():
    """Past the kernel's patch limit: a ValueError naming images, before any launch."""
    images = torch.zeros(1, 1, 8 * 33, 8 * 32, device=DEVICE)
    with pytest.raises(ValueError, match="images"):
        pgs_kernels.pgs_select(images, patch_size=8, backend="triton")


def test_op_arguments_order_matches_reference():
    """The kernel's entry takes the operator's arguments in the reference core's order."""
    images, tokens, noise = make_inputs(29, 2, 3, 32, 48, 8, tokens="fp32")
    args = (images, tokens, noise, 8, 12, 3, 0.5, 0.5, 1.0, True, 0.05, 20)
    out = triton_pgs.pgs_select_triton(*args)
    ref = python_ref.pgs.pgs_select_core(*args, torch.float64)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1]) and torch.equal(out[3], ref[3])


# ---- CUDA only -------------------------------------------------------------------------


def _cuda_args(seed=30, B=8, H=64, W=96, P=16):
    return make_inputs(seed, B, 3, H, W, P, tokens="bf16", device="cuda")


@cuda_only
def test_torch_compile_fullgraph():
    images, tokens, noise = _cuda_args()

    def f(x, t, u):
        sel = pgs_kernels.pgs_select(x, t, noise=u, patch_size=16, token_weight=0.5)
        return torch.gather(t, 1, sel.keep_idx[..., None].expand(-1, -1, t.shape[2]))

    eager = f(images, tokens, noise)
    compiled = torch.compile(f, fullgraph=True)(images, tokens, noise)
    assert torch.equal(eager, compiled)


@cuda_only
def test_cuda_graph_replay():
    images, tokens, noise = _cuda_args()
    static = [images.clone(), tokens.clone(), noise.clone()]

    def step():
        return pgs_kernels.pgs_select(*static[:2], noise=static[2], patch_size=16, token_weight=0.5,
                                      return_scores=True, backend="triton")

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    new = _cuda_args(seed=31)
    for dst, src in zip(static, new):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for a, b in zip(out, eager):
        assert torch.equal(a, b)


@cuda_only
def test_vit_b16_size():
    g = torch.Generator(device="cuda").manual_seed(32)
    images = torch.randn(256, 3, 224, 224, device="cuda", generator=g)
    tokens = torch.randn(256, 196, 768, device="cuda", generator=g).bfloat16()
    noise = torch.rand(256, 196, device="cuda", generator=g)
    _check(images, tokens, noise, patch_size=16, token_weight=0.5)
