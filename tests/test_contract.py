"""pgs_kernels.contract: the checks every entry point shares, the raw
operator's checks (for the operator, its fake implementation and each
backend's kernel behind it), and the noise draw. The numerical promises that
concern every backend (flat patches, non-finite inputs, ranges) are held in
test_agreement.py."""

import math
from unittest import mock

import pytest
import torch

import pgs_kernels
from conftest import BACKENDS, DEVICE, assert_valid_selection
from pgs_kernels import contract, op, pgs_select

OP = torch.ops.pgs_kernels.pgs_select
#: Each backend's kernel as the operator runs it: its checks, then its code.
KERNELS = {"native": op.native_kernel, "triton": op.triton_kernel, "reference": op.reference_kernel}


def _on_its_device(backend, args):
    """The arguments on the device where ``backend``'s kernel runs (Triton:
    CUDA, or CPU under the interpreter; the others the CPU)."""
    dev = DEVICE if backend == "triton" else "cpu"
    return tuple(a.to(dev) if isinstance(a, torch.Tensor) else a for a in args)


def _op_args(**over):
    g = torch.Generator().manual_seed(0)
    args = dict(images=torch.randn(2, 3, 32, 32, generator=g), tokens=None,
                noise=torch.rand(2, 16, generator=g), patch_size=8, num_keep=8, num_candidates=2,
                sim_threshold=0.5, token_weight=0.0, edge_weight=1.0, use_ot=True, ot_reg=0.05, ot_iters=20)
    args.update(over)
    return tuple(args.values())


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
    args = _op_args(images=torch.empty(2, 3, 32, 32, device="meta"), noise=torch.empty(2, 16, device="meta"))
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
        (dict(images=torch.randn(2, 3, 32, 32, dtype=torch.float64)), TypeError, "images"),
        (dict(images=torch.randn(3, 32, 32)), ValueError, "images"),
        (dict(tokens=torch.randn(2, 15, 8), token_weight=0.5), ValueError, "tokens"),
        (dict(token_weight=0.5), ValueError, "token_weight"),
        (dict(token_weight=1.5, tokens=torch.randn(2, 16, 8)), ValueError, "token_weight"),
        (dict(token_weight=float("nan"), tokens=torch.randn(2, 16, 8)), ValueError, "token_weight"),
    ],
)
def test_raw_op_checks_what_keeps_it_safe(over, exc, match):
    """The operator (on the CPU here), its fake implementation used for shape
    inference, and every backend's kernel behind it reject, with
    pgs_select's messages, what would make them read or write memory they
    should not: shapes, dtypes, devices, counts, and the token weight that
    decides which terms they evaluate."""
    args = _op_args(**over)
    with pytest.raises(exc, match=match):
        OP(*args)
    with pytest.raises(exc, match=match):
        contract.check_op_args(*args)
    meta = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
    with pytest.raises(exc, match=match):
        OP(*meta)
    for backend in BACKENDS:
        with pytest.raises(exc, match=match):
            KERNELS[backend](*_on_its_device(backend, args))


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
@pytest.mark.parametrize("backend", BACKENDS)
def test_raw_op_out_of_range_scalars_give_a_valid_selection(over, backend):
    """The ranges of the other scalars are pgs_select's to check
    (test_api.py's test_errors_*): given them directly, every backend's
    kernel computes a meaningless but valid selection and touches no memory
    it should not."""
    keep, mask, *_ = KERNELS[backend](*_on_its_device(backend, _op_args(**over)))
    assert_valid_selection(contract.PGSSelection(keep, mask), 2, 16, 8)
    if backend == BACKENDS[0]:
        keep, mask, *_ = OP(*_op_args(**over))
        assert_valid_selection(contract.PGSSelection(keep, mask), 2, 16, 8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("over", [
    dict(num_keep=16, num_candidates=16), dict(num_keep=1, num_candidates=0),
    dict(token_weight=1.0, tokens=torch.randn(2, 16, 8, dtype=torch.float64)),
    dict(noise=torch.rand(2, 16, dtype=torch.float64), images=torch.randn(2, 3, 32, 32).half()),
    dict(images=torch.randn(2, 3, 32, 32).bfloat16(), edge_weight=contract.FP32_MAX),
    dict(edge_weight=0.0, ot_reg=1e-4, ot_iters=1), dict(sim_threshold=float("inf")),
    dict(tokens=torch.randn(2, 20, 8)[:, :16], token_weight=0.25),
], ids=["all", "one-kept-no-candidates", "fp64-tokens-only", "fp64-noise-fp16-images", "bf16-largest-edge-weight",
        "smallest-ot-reg-one-step", "infinite-threshold", "sliced-tokens"])
def test_raw_op_accepts_the_edges_of_every_range(over, backend):
    """At the edges of what it accepts (every count, dtype and scalar bound,
    strided tokens) the operator and each backend's kernel give a valid
    selection of the counts asked for."""
    K = over.get("num_keep", 8)
    for f in (OP, KERNELS[backend]):
        keep, mask, edge, cand, red = f(*_on_its_device(backend, _op_args(**over)))
        assert_valid_selection(contract.PGSSelection(keep.cpu(), mask.cpu()), 2, 16, K)
        assert tuple(cand.shape) == (2, over.get("num_candidates", 2))
