"""The torch.library operator: schema, fake implementation, torch.compile."""

import pytest
import torch

import pgs_kernels
from conftest import DEVICE


def _args(B=2, device=DEVICE, tokens=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 3, 32, 48, generator=g).to(device)
    t = torch.randn(B, 24, 8, generator=g).to(device) if tokens else None
    noise = torch.rand(B, 24, generator=g).to(device)
    return (x, t, noise, 8, 12, 2, 0.5, 0.5 if tokens else 0.0, 1.0, True, 0.05, 20)


# (tokens, token_weight, use_ot, num_candidates, channels-last images)
OPCHECK_CASES = [(True, 0.5, True, 2, False), (False, 0.0, True, 2, True), (True, 1.0, False, 3, True),
                 (True, 1.0, True, 0, False)]


@pytest.mark.parametrize("tokens,tw,use_ot,k,channels_last", OPCHECK_CASES)
def test_opcheck(tokens, tw, use_ot, k, channels_last):
    """The registration is sound (schema, fake implementation, autograd and
    functionalization), for the kernel of this machine's device."""
    x, t, noise = _args(tokens=tokens)[:3]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = (x, t, noise, 8, 12, k, 0.5, tw, 1.0, use_ot, 0.05, 20)
    torch.library.opcheck(torch.ops.pgs_kernels.pgs_select.default, args)


def test_fake_shapes_match_real():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _args()
    real = torch.ops.pgs_kernels.pgs_select(*args)
    with FakeTensorMode() as mode:
        fargs = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        fake = torch.ops.pgs_kernels.pgs_select(*fargs)
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.dtype == f.dtype


def test_compile_fullgraph_select_and_gather():
    def step(images, tokens, noise):
        sel = pgs_kernels.pgs_select(images, tokens, noise=noise, patch_size=8, token_weight=0.5)
        idx = sel.keep_idx[..., None].expand(-1, -1, tokens.shape[-1])
        return torch.gather(tokens, 1, idx)

    x, t, noise = _args()[:3]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, t, noise), step(x, t, noise))


# --------------------------------------------------------------------------- a weight on a schedule


@pytest.mark.parametrize("tw", [0.0, 0.3, 1.0])
def test_scheduled_operator_is_the_operator_with_its_weight_read(tw):
    """pgs_select_scheduled takes token_weight as a 0-dim CPU tensor and
    computes what pgs_select computes with that float; opcheck for its
    registration."""
    args = list(_args())
    weight = torch.tensor(tw, dtype=torch.float64)
    want = torch.ops.pgs_kernels.pgs_select(*args[:7], tw, *args[8:])
    got = torch.ops.pgs_kernels.pgs_select_scheduled(*args[:7], weight, *args[8:])
    for w, g in zip(want, got):
        assert torch.equal(w, g)
    torch.library.opcheck(torch.ops.pgs_kernels.pgs_select_scheduled.default, (*args[:7], weight, *args[8:]))


def test_scheduled_operator_checks_its_weight():
    args = list(_args())
    with pytest.raises(ValueError, match="token_weight must be in"):
        torch.ops.pgs_kernels.pgs_select_scheduled(*args[:7], torch.tensor(1.5), *args[8:])
    with pytest.raises(ValueError, match="token_weight must not be NaN"):
        torch.ops.pgs_kernels.pgs_select_scheduled(*args[:7], torch.tensor(float("nan")), *args[8:])


def test_a_weight_that_changes_compiles_once():
    """A float token_weight is a constant of the compiled graph, so a schedule
    changing it would recompile at every epoch (and, under fullgraph=True, fail
    past dynamo's recompile limit of 8); held in a CPU tensor it is an input."""
    from torch._dynamo.testing import CompileCounterWithBackend

    x, t, noise = _args()[:3]
    weight = torch.tensor(0.0, dtype=torch.float64)

    def step(images, tokens, noise):
        return pgs_kernels.pgs_select(images, tokens, noise=noise, patch_size=8, token_weight=weight).keep_idx

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    compiled(x, t, noise)
    compiled_once = counter.frame_count
    for epoch in range(1, 12):  # past the recompile limit
        weight.fill_(epoch / 12)
        want = pgs_kernels.pgs_select(x, t, noise=noise, patch_size=8, token_weight=epoch / 12).keep_idx
        assert torch.equal(compiled(x, t, noise), want)
    assert counter.frame_count == compiled_once
