"""Differential fuzzing in CI: every CPU backend against the fp64 reference on
random shapes, dtypes, layouts, magnitudes within the contract's range, flat
and NaN regions (python_ref/fuzz.py draws the cases; each is one seed, printed on
failure: ``python -m bench.fuzz --seed N --cases 1`` replays it). A fixed
range of seeds, so a run is reproducible; the longer campaign is
``python -m bench.fuzz --seconds 600``."""

import pytest

import pgs_kernels
from python_ref.fuzz import CATEGORIES, fuzz

CPU_BACKENDS = [b for b in pgs_kernels.available_backends("cpu") if b != "triton"]


def _assert_clean(res):
    bad = [f for f in res["findings"] if f["category"] != "near_tie"]
    lines = [f"seed {f['seed']} {f['backend']}: {f['message']} [{f['case']}]" for f in bad[:10]]
    assert not bad, f"{len(bad)} contract breaches:\n" + "\n".join(lines)
    for b, c in res["counts"].items():
        assert c["cases"] > 0, b
        # Near-ties are allowed but must stay rare, or the exact comparison says little.
        assert c["near_tie"] <= 0.02 * c["cases"], (b, c)


@pytest.mark.parametrize("start", [0, 100_000])
def test_cpu_backends_against_fp64(start):
    res = fuzz(CPU_BACKENDS, seconds=600, seed0=start, max_cases=1500)
    assert set(res["counts"]) == set(CPU_BACKENDS) and set(CATEGORIES) <= set(next(iter(res["counts"].values())))
    _assert_clean(res)


@pytest.mark.skipif("triton" not in pgs_kernels.available_backends(), reason="Triton is not usable here")
def test_triton_against_fp64_on_tiny_cases():
    # Interpreted on CPU, a few tiny cases. Compiled on CUDA, every new shape,
    # dtype or ot_iters is a fresh kernel (0.3-7 s to compile), and the GPU
    # suite's tests part has 8 minutes for the whole suite: 24 cases (under
    # 3 minutes of compiling), ot_iters from a few values.
    import torch

    if torch.cuda.is_available():
        n, ot_iters_from = 24, (1, 5, 20)
    else:
        n, ot_iters_from = 12, None
    res = fuzz(["triton"], seconds=600, seed0=200_000, max_cases=n, max_patches=16, ot_iters_from=ot_iters_from)
    _assert_clean(res)
