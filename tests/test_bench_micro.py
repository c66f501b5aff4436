"""pytest-benchmark suite: every implementation that bench/micro.py times, on
the benchmark's own inputs (``micro.make_inputs``) at a small shape, called
as the harness calls it (``f(images, tokens, noise, P, token_weight)``).

It runs with the normal test run (``python -m pytest``) in a few seconds and
asserts what the harness could get wrong, never a time (timings on a shared
2-core machine say nothing): that each implementation computes what its row
is named for on those inputs (the PGS ones the fp64 reference's selection,
``random`` the lowest-noise patches, ``published`` a valid selection of at
most K), and that each timing carries the machine's load
(``extra_info["load"]``); a busy machine gets a warning in the test summary.
For the table: ``pytest tests/test_bench_micro.py --benchmark-enable``;
larger sweeps: ``python -m bench.micro``.
"""

import os
import warnings

import pytest
import torch

import python_ref
from bench import micro
from bench.common import LoadRecord
from conftest import DEVICE, assert_valid_selection
from pgs_kernels import pgs_counts
from python_ref.compare import decided_rows

B, RES, P = 4, 64, 16
L = (RES // P) ** 2
K, _, _ = pgs_counts(L, 0.5, 0.05)
# What micro.py times on this device (the compiled reference aside: minutes of compiling).
IMPLS = micro.make_impls(torch.device(DEVICE), None, compile_ok=False)


@pytest.fixture(scope="module")
def load():
    rec = LoadRecord(quiet=True)
    yield rec
    rec.finish()
    if rec.warnings:
        warnings.warn("the benchmark timings of this run measure a busy machine: " + "; ".join(rec.warnings))


def _holds_the_reference_selection(sel, images, tokens, noise, tw):
    """keep_idx and mask equal to the fp64 reference's on every decided row (most of them)."""
    ref = python_ref.pgs_select(images.double(), tokens.double() if tw > 0 else None, noise=noise, patch_size=P,
                                token_weight=tw, return_scores=True)
    decided = decided_rows(ref, noise, 1.0, K, 0.5)
    assert decided.float().mean() >= 0.5
    assert torch.equal(sel.keep_idx.cpu()[decided], ref.keep_idx.cpu()[decided])
    assert torch.equal(sel.mask.cpu()[decided], ref.mask.cpu()[decided])


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("tokens_dtype", [None, "bf16"], ids=["pixels", "tokens"])
def test_bench_implementation(benchmark, load, impl, tokens_dtype):
    """One of micro.py's rows: timed with the load recorded, and right."""
    tdt = micro.DTYPES[tokens_dtype] if tokens_dtype else None
    tw = micro.TOKEN_WEIGHT if tdt is not None else 0.0
    images, tokens, noise = micro.make_inputs(B, RES, P, torch.float32, tdt, torch.device(DEVICE))
    backend, f = IMPLS[impl]
    benchmark.group = "pgs_select" if impl.startswith("pgs_select") else "baselines"
    benchmark.extra_info.update(load=load.record(), backend=backend)
    # pedantic: a fixed, small number of rounds keeps the suite fast whatever
    # the default calibration would choose.
    sel = benchmark.pedantic(lambda: f(images, tokens, noise, P, tw), rounds=5, iterations=1, warmup_rounds=1)

    rec = benchmark.extra_info["load"]
    assert rec["cpus"] == os.cpu_count() and rec["threads"] == torch.get_num_threads()
    assert {"before", "others_cores_before", "busy", "warning"} <= set(rec)
    if impl == "published":  # its keep count depends on the batch; it never exceeds K
        assert 1 <= sel.keep_idx.shape[1] <= K
        assert_valid_selection(sel, B, L, sel.keep_idx.shape[1])
        return
    assert_valid_selection(sel, B, L, K)
    if impl == "random":  # the M patches of lowest noise, whatever the images
        dropped = torch.sort(noise.cpu(), dim=1, stable=True).indices[:, : L - K]
        assert sel.mask.cpu().gather(1, dropped).all()
    else:
        _holds_the_reference_selection(sel, images, tokens, noise, tw)
