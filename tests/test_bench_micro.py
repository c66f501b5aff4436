"""pytest-benchmark suite: each selection implementation at a small shape.

It runs with the normal test run (``python -m pytest``) in a few seconds and
asserts only that each call returns a well-formed selection, never a time:
timings on a shared 2-core machine say nothing. Each timing carries the
machine's load (``extra_info["load"]``), and a busy machine gets a warning in
the test summary. Larger sweeps live in ``bench/micro.py``.
"""

import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message="pgs_kernels: the native CPU kernel is not built")

import pgs_kernels  # noqa: E402
import python_ref  # noqa: E402
from bench.common import LoadRecord  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, RES, P = 4, 64, 16
L = (RES // P) ** 2
K = max(1, int(L * 0.5))
INTERPRETED = DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(B, 3, RES, RES, generator=g).to(DEVICE)
    tokens = torch.randn(B, L, 32, generator=g).to(DEVICE)
    noise = torch.rand(B, L, generator=g).to(DEVICE)
    return images, tokens, noise


@pytest.fixture(scope="module")
def load():
    rec = LoadRecord(quiet=True)
    yield rec
    rec.finish()
    if rec.warnings:
        warnings.warn("the benchmark timings of this run measure a busy machine: " + "; ".join(rec.warnings))


def _run(benchmark, fn, load, rounds=5, warmup_rounds=1):
    # pedantic: a fixed, small number of rounds keeps the suite fast whatever
    # the default calibration would choose.
    benchmark.extra_info["load"] = load.record()
    return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)


def _check(sel, keep=K):
    assert tuple(sel.keep_idx.shape) == (B, keep)
    assert int(sel.mask.sum()) == B * (L - keep)


@pytest.mark.parametrize("backend", pgs_kernels.available_backends(DEVICE))
@pytest.mark.parametrize("with_tokens", [False, True], ids=["pixels", "tokens"])
def test_bench_pgs_select(benchmark, inputs, load, backend, with_tokens):
    images, tokens, noise = inputs
    kw = dict(noise=noise, patch_size=P, backend=backend)
    if with_tokens:
        kw.update(token_weight=0.5)
    # Under the Triton interpreter (CPU, TRITON_INTERPRET=1) one call takes
    # seconds: time it once, as a smoke test of the benchmark path.
    interp = backend == "triton" and INTERPRETED
    benchmark.group = "pgs_select"
    benchmark.extra_info["interpreted"] = interp
    sel = _run(benchmark, lambda: pgs_kernels.pgs_select(images, tokens if with_tokens else None, **kw), load,
               rounds=1 if interp else 5, warmup_rounds=0 if interp else 1)
    _check(sel)


def test_bench_reference_fp32(benchmark, inputs, load):
    images, _, noise = inputs
    benchmark.group = "baselines"
    _check(_run(benchmark, lambda: python_ref.pgs_select(images, noise=noise, patch_size=P, dtype=torch.float32),
                load))


def test_bench_published(benchmark, inputs, load):
    images, _, noise = inputs
    benchmark.group = "baselines"
    sel = _run(benchmark, lambda: python_ref.published_pgs(images, noise=noise, patch_size=P), load)
    # The published keep count depends on the batch; it never exceeds K.
    assert 1 <= sel.keep_idx.shape[1] <= K


def test_bench_random_masking(benchmark, inputs, load):
    images, _, noise = inputs
    benchmark.group = "baselines"
    _check(_run(benchmark, lambda: python_ref.random_masking(images, noise=noise, patch_size=P), load))
