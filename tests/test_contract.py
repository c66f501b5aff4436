"""pgs_kernels.contract: the checks every entry point shares, the raw
operator's checks, the noise draw, and the numerical promises of the
contract that concern every backend (flat patches, ranges)."""

import math
from unittest import mock

import pytest
import torch

import pgs_kernels
import python_ref as R
from conftest import DEVICE, assert_valid_selection
from pgs_kernels import contract, pgs_select

BACKENDS = pgs_kernels.available_backends(DEVICE)
OP = torch.ops.pgs_kernels.pgs_select


def _op_args(**over):
    g = torch.Generator().manual_seed(0)
    args = dict(images=torch.randn(2, 3, 64, 64, generator=g), tokens=None,
                noise=torch.rand(2, 16, generator=g), patch_size=16, num_keep=8, num_candidates=2,
                sim_threshold=0.5, token_weight=0.0, edge_weight=1.0, use_ot=True, ot_reg=0.05, ot_iters=20)
    args.update(over)
    return tuple(args.values())


# --------------------------------------------------------------------------- constant patches


@pytest.mark.parametrize("value", [0.7, 1.0 / 3.0, -1.3, 2.0, 0.1])
@pytest.mark.parametrize("C,P", [(1, 16), (3, 8), (3, 14)])
def test_constant_patches_have_zero_similarity_in_fp32(value, C, P):
    # Half of each image flat at a value whose mean does not come out exact in fp32.
    g = torch.Generator().manual_seed(1)
    H, W = 4 * P, 4 * P
    x = torch.randn(2, C, H, W, generator=g)
    x[..., : W // 2] = value
    L = 16
    flat = torch.zeros(4, 4, dtype=torch.bool)
    flat[:, :2] = True
    flat = flat.reshape(L)
    noise = torch.rand(2, L, generator=g)
    kw = dict(noise=noise, patch_size=P, candidate_ratio=0.25, sim_threshold=0.1, edge_weight=0.0,
              return_scores=True)
    exact = R.pgs_select(x.double(), **kw)
    # Every flat patch is exactly orthogonal to every candidate: its S row is 0.
    S = R.candidate_similarity(x.float(), None, exact.candidates, P, 0.0, torch.float32)
    assert (S[:, :, flat] == 0).all()
    assert (S.transpose(1, 2)[:, flat].abs().sum(-1) == 0).all()
    for backend in BACKENDS:
        got = pgs_select(x.to(DEVICE), noise=noise.to(DEVICE), backend=backend,
                         **{k: v for k, v in kw.items() if k != "noise"})
        assert torch.equal(got.keep_idx.cpu(), exact.keep_idx), backend


def test_flat_region_example():
    # A letterbox-like flat half: with edge_weight=0 the candidates come from
    # the noise alone; the flat patches must not look redundant to them.
    x = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    x[..., :32] = 0.7
    noise = torch.rand(1, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(noise=noise, candidate_ratio=0.25, sim_threshold=0.1, edge_weight=0.0, return_scores=True)
    exact = R.pgs_select(x.double(), **kw)
    for backend in BACKENDS:
        got = pgs_select(x.to(DEVICE), backend=backend, **{**kw, "noise": noise.to(DEVICE)})
        flat = torch.tensor([j % 4 < 2 for j in range(16)])
        not_cand = torch.ones(16, dtype=torch.bool)
        not_cand[exact.candidates[0]] = False
        assert (got.redundancy[0].cpu()[flat & not_cand] == 0).all(), backend
        assert torch.equal(got.keep_idx.cpu(), exact.keep_idx), backend


# --------------------------------------------------------------------------- ranges


@pytest.mark.parametrize("ot_reg", [1e-5, 5e-5, 1e-8, 0.0])
def test_ot_reg_below_the_fp32_range_is_rejected(ot_reg):
    with pytest.raises(ValueError, match=r"ot_reg must be in \[0.0001, inf\)"):
        pgs_select(torch.randn(1, 3, 32, 32), ot_reg=ot_reg)


def test_range_messages_show_open_infinite_bounds():
    with pytest.raises(ValueError, match=r"ot_reg must be in \[0.0001, inf\), got inf"):
        pgs_select(torch.randn(1, 3, 32, 32), ot_reg=math.inf)
    with pytest.raises(ValueError, match=r"edge_weight must be in \[0.0, 3.40\d*e\+38\], got 1e\+39"):
        pgs_select(torch.randn(1, 3, 32, 32), edge_weight=1e39)
    with pytest.raises(ValueError, match=r"edge_weight must be in \[0.0, 3.40\d*e\+38\], got inf"):
        pgs_select(torch.randn(1, 3, 32, 32), edge_weight=math.inf)


def test_largest_fp32_edge_weight_is_accepted():
    sel = pgs_select(torch.randn(2, 3, 32, 32), patch_size=8, edge_weight=contract.FP32_MAX, return_scores=True)
    assert_valid_selection(sel, 2, 16, 8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ot_reg,ot_iters", [(1e-4, 50), (3e-4, 1000), (1e-3, 200)])
def test_small_ot_reg_agrees_with_fp64(backend, ot_reg, ot_iters):
    """Down to the contract's ot_reg = 1e-4, over up to 1000 iterations: the
    redundancy within 1e-4 of fp64, and inside [-1, 1] as an average of
    similarities must be."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 32, 32, generator=g)
    noise = torch.rand(2, 16, generator=g)
    kw = dict(noise=noise, patch_size=8, candidate_ratio=0.25, ot_reg=ot_reg, ot_iters=ot_iters,
              return_scores=True)
    exact = R.pgs_select(x.double(), **kw)
    got = pgs_select(x.to(DEVICE), backend=backend, **{**kw, "noise": noise.to(DEVICE)})
    same = (got.candidates.cpu() == exact.candidates).all(1)
    assert same.any()
    torch.testing.assert_close(got.redundancy.cpu().double()[same], exact.redundancy[same], atol=1e-4, rtol=0)
    r = got.redundancy[torch.isfinite(got.redundancy)]
    assert (r.abs() <= 1 + 1e-5).all()


# --------------------------------------------------------------------------- devices and generators


def test_meta_images_name_images():
    with pytest.raises(ValueError, match="images must be on a device that holds values"):
        pgs_select(torch.randn(1, 3, 32, 32, device="meta"))


def test_generator_type_and_device_are_checked():
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(TypeError, match="generator"):
        pgs_select(x, generator=123)
    other = mock.MagicMock(spec=torch.Generator)
    other.device = torch.device("cuda", 0)
    with pytest.raises(ValueError, match="generator must be on images' device type cpu"):
        pgs_select(x, generator=other)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generator_with_cpu_images():
    with pytest.raises(ValueError, match="generator"):
        pgs_select(torch.randn(1, 3, 32, 32), generator=torch.Generator(device="cuda"))


def test_noise_draw_passes_no_explicit_none_generator():
    with mock.patch.object(torch, "rand", wraps=torch.rand) as rand:
        contract.draw_noise(2, 3, "cpu")
    assert "generator" not in rand.call_args.kwargs


# --------------------------------------------------------------------------- the raw operator


def test_raw_op_mixed_devices_is_an_error_not_garbage():
    # Mixed devices land on the fake implementation (the Meta key wins).
    with pytest.raises(ValueError, match="noise must be on images' device"):
        OP(*_op_args(noise=torch.rand(2, 16, device="meta")))


def test_raw_op_on_meta_infers_shapes():
    args = _op_args(images=torch.empty(2, 3, 64, 64, device="meta"), noise=torch.empty(2, 16, device="meta"))
    keep, mask, edge, cand, red = OP(*args)
    assert keep.device.type == "meta" and tuple(keep.shape) == (2, 8) and tuple(cand.shape) == (2, 2)
    assert mask.dtype == torch.bool and tuple(red.shape) == (2, 16)


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(num_keep=0), ValueError, "num_keep"),
        (dict(num_keep=17), ValueError, "num_keep"),
        (dict(num_candidates=-1), ValueError, "num_candidates"),
        (dict(num_candidates=17), ValueError, "num_candidates"),
        (dict(patch_size=5), ValueError, "patch_size=5"),
        (dict(patch_size=0), ValueError, "patch_size"),
        (dict(noise=torch.rand(2, 15)), ValueError, "noise"),
        (dict(noise=torch.zeros(2, 16, dtype=torch.int64)), TypeError, "noise"),
        (dict(images=torch.randn(2, 3, 64, 64, dtype=torch.float64)), TypeError, "images"),
        (dict(images=torch.randn(3, 64, 64)), ValueError, "images"),
        (dict(tokens=torch.randn(2, 15, 8), token_weight=0.5), ValueError, "tokens"),
        (dict(token_weight=0.5), ValueError, "token_weight"),
        (dict(token_weight=1.5, tokens=torch.randn(2, 16, 8)), ValueError, "token_weight"),
        (dict(token_weight=float("nan"), tokens=torch.randn(2, 16, 8)), ValueError, "token_weight"),
    ],
)
def test_raw_op_checks_what_keeps_it_safe(over, exc, match):
    """Every kernel of the operator (the CPU one here, and the fake one used
    for shape inference) rejects, with pgs_select's messages, what would make
    it read or write memory it should not: shapes, dtypes, devices, counts,
    and the token weight that decides which terms it evaluates."""
    args = _op_args(**over)
    with pytest.raises(exc, match=match):
        OP(*args)
    with pytest.raises(exc, match=match):
        contract.check_op_args(*args)
    meta = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
    with pytest.raises(exc, match=match):
        OP(*meta)


# --------------------------------------------------------------------------- torch.compile


def test_compiled_layer_survives_a_partial_last_batch():
    """noise=None under torch.compile(fullgraph=True) while the batch size
    changes, as at the short last batch of an epoch."""
    layer = pgs_kernels.PGSPatchDropout(mask_ratio=0.5, patch_size=16).train()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for B in (8, 8, 8, 5):
        x = torch.randn(B, 1 + 4, 32)
        images = torch.randn(B, 3, 32, 32)
        y = compiled(x, images)
        assert tuple(y.shape) == (B, 3, 32)
        assert torch.equal(y[:, 0], x[:, 0])


@pytest.mark.parametrize("over", [dict(edge_weight=-1.0), dict(edge_weight=1e39), dict(ot_reg=0.0),
                                  dict(ot_reg=float("nan")), dict(ot_iters=0), dict(ot_iters=-3),
                                  dict(sim_threshold=float("nan"))])
def test_raw_op_out_of_range_scalars_give_a_valid_selection(over):
    """The ranges of the other scalars are pgs_select's to check (test above:
    test_errors_*): given them directly, a kernel computes a meaningless but
    valid selection and touches no memory it should not."""
    keep, mask, *_ = OP(*_op_args(**over))
    assert_valid_selection(contract.PGSSelection(keep, mask), 2, 16, 8)
