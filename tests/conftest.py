"""Shared fixtures, the one input generator, and the comparison helpers.

Two things must happen before anything imports torch's thread pool or Triton:

* Threads. On a shared 2-core machine, intra-op (OpenMP) threads wait out
  each other's time slices whenever another process is busy: 10x slower and
  worse has been seen. The suite runs single-threaded (``OMP_NUM_THREADS`` for
  the subprocesses it starts, ``torch.set_num_threads(1)`` here); the tests of
  threading itself set their own counts.
* Without a GPU, Triton kernels run through the interpreter on CPU tensors;
  the variable must be set before Triton decorates a kernel, i.e. before
  pgs_kernels is imported.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import pgs_kernels  # noqa: E402
import python_ref  # noqa: E402
from pgs_kernels import pgs_counts, samples  # noqa: E402
from python_ref.compare import compare_with_reference, selection_errors  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: Every backend usable on DEVICE here: native (CPU, when built), triton
#: (compiled on CUDA, interpreted on CPU), reference.
BACKENDS = pgs_kernels.available_backends(DEVICE)
#: Triton through its interpreter: a kernel's arithmetic in numpy, seconds a call.
INTERPRETED = DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
LAYOUTS = ("contiguous", "channels_last", "slice")
#: Token modes of make_inputs: None (no tokens), a dtype name, or a layout/width.
TOKEN_MODES = (None, "fp32", "bf16", "fp16", "fp64", "strided", "odd", "dslice", "wide")

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


# --------------------------------------------------------------------------- inputs


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


def add_flat_regions(x, P, value=0.7):
    """In place: the top-left quarter nearly constant (its mean plus a
    hundredth of its variation, as sky or a wall in a photo) and the
    bottom-right patch exactly ``value``, a constant that does not average
    exactly in fp32 (the flat-patch path: zero similarity to everything)."""
    B, C, H, W = x.shape
    top = x[:, :, : H // 2, : W // 2]
    top.copy_(top.mean() + 0.01 * top)
    if H >= 2 * P and W >= 2 * P:
        x[:, :, H - P :, W - P :] = value
    return x


def patch_tokens(images, P, D, seed, dtype=torch.float32):
    """Tokens that are a fixed random projection of the patch pixels (like a
    patch embedding) plus noise, on ``images``' device."""
    g = torch.Generator().manual_seed(seed + 1000)
    x = python_ref.patchify(images.float().cpu(), P)
    proj = torch.randn(x.shape[2], D, generator=g) / x.shape[2] ** 0.5
    t = x @ proj + 0.5 * torch.randn(x.shape[0], x.shape[1], D, generator=g)
    return t.to(dtype).to(images.device)


def _lay_out(x, layout):
    """``x`` with the same values in ``layout``: contiguous, channels-last, or
    a strided view (offsets in every dimension, every other column)."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    assert layout == "slice", layout
    B, C, H, W = x.shape
    big = torch.zeros(B + 1, C + 1, H + 3, 2 * W + 1, dtype=x.dtype, device=x.device)
    big[1:, 1:, 2 : 2 + H, 1::2] = x
    view = big[1:, 1:, 2 : 2 + H, 1::2]
    assert not view.is_contiguous()
    return view


def _token_mode(base, mode):
    """Tokens of ``mode`` (TOKEN_MODES) from fp32 ``base`` (B, L, 48)."""
    if mode in ("fp32", "bf16", "fp16", "fp64"):
        return base[:, :, :24].to(DTYPES[mode]).contiguous()
    if mode == "strided":  # stride(2) != 1
        return base[:, :, :24].transpose(1, 2).contiguous().transpose(1, 2)
    if mode == "odd":  # D = 37: not a multiple of any vector width
        return base[:, :, :37].contiguous()
    if mode == "dslice":  # unit stride along D, a row stride larger than D
        return base[:, :, :24]
    assert mode == "wide", mode  # D = 200: several blocks of the token dimension
    return base


def make_inputs(seed, B, C, H, W, P, dtype="fp32", layout="contiguous", tokens=None, *, flat=True,
                device=DEVICE):
    """The one input generator of the suite: ``(images, tokens, noise)``.

    ``images``: structure at several scales (smooth_images), with a nearly
    constant quarter and an exactly constant patch (add_flat_regions; off with
    ``flat=False``), in ``dtype`` ("fp32", "bf16", "fp16") and ``layout``
    (LAYOUTS); the values do not depend on the layout. ``tokens``: None or a
    mode of TOKEN_MODES (D = 24; "odd" 37, "wide" 200), a projection of the
    patches plus noise. ``noise``: U[0, 1), a transposed (non-contiguous) view
    with the "slice" layout. Everything seeded by ``seed``."""
    x = smooth_images(B, C, H, W, seed)
    if flat:
        add_flat_regions(x, P)
    images = _lay_out(x.to(DTYPES[dtype]).to(device), layout)
    L = (H // P) * (W // P)
    toks = None
    if tokens is not None:
        D = 200 if tokens == "wide" else 48
        toks = _token_mode(patch_tokens(images, P, D, seed), tokens)
    noise = torch.rand(B, L, generator=torch.Generator().manual_seed(seed + 7)).to(device)
    if layout == "slice":
        noise = noise.t().contiguous().t()
    return images, toks, noise


# --------------------------------------------------------------------------- checks


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


def assert_pgs_keeps_state_dict(model, plain):
    """use_pgs and the schedule leave a model's state_dict keys as they were,
    and checkpoints load strictly both ways (``plain``: the same model without PGS)."""
    keys = list(plain.state_dict())
    pgs_kernels.use_pgs(model)
    pgs_kernels.set_pgs_epoch(model, 3, 10)
    assert list(model.state_dict()) == keys
    plain.load_state_dict(model.state_dict())  # strict
    model.load_state_dict(plain.state_dict())


def expected_pgs_tokens(x, images, rng, P, n, **options):
    """What a PGS layer given the sequence ``x`` (``n`` prefix tokens, then the
    patch tokens of ``images``) must pass on: the prefix tokens, then the patch
    tokens ``pgs_select`` keeps with the same options and the same noise (drawn
    from the RNG state ``rng`` the layer started from). Returns (tokens, selection)."""
    saved = torch.get_rng_state()
    torch.set_rng_state(rng)
    tw = options.get("token_weight", 0.0)
    sel = pgs_kernels.pgs_select(images, x[:, n:] if tw > 0 else None, patch_size=P, **options)
    torch.set_rng_state(saved)
    idx = sel.keep_idx[..., None].expand(-1, -1, x.shape[-1])
    return torch.cat([x[:, :n], torch.gather(x[:, n:], 1, idx)], 1), sel
