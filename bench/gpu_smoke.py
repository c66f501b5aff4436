"""First look at the fused Triton kernel on a GPU, in under two minutes.

    python -m bench.gpu_smoke [--out DIR] [--refresh]

Sections, each written into ``<out>/gpu-smoke-<device>.json`` as soon as it
is done (a run cut short still leaves what it measured):

* ``compile``: every launch of the ViT-B/16 call compiled and run once; the
  registers, spills and shared memory of the kernels as loaded;
* ``agreement``: against the fp64 reference (``python_ref``) on five photos
  (scikit-image samples, as ``tests/conftest.py`` loads them) and on random
  inputs with structure, by the tests' rule (``python_ref.compare``): edge
  and redundancy within 1e-4, candidates and selections equal on the rows
  decided by more than that;
* ``determinism``: two calls on the same inputs give the same bits;
* ``invariants``: NaN and Inf in images, tokens and noise still give valid
  selections;
* ``layouts``: channels-last and sliced inputs agree with contiguous ones
  within 1e-4 (selections equal on decided rows);
* ``timing``: median time (``bench.common.time_cuda``, ``triton.testing.do_bench``)
  at batch 32 and 256, 224/16, fp32 images, bf16 tokens of width 768, ``token_weight = 0.5``,
  against the bandwidth floor measured in the same run (a device-to-device
  copy: the bytes the call must read, at the copy's bandwidth, plus its
  outputs); then batch 256 without OT, with tokens only, with pixels only
  and without candidates, so the time splits by step. The 0.2 ms target is
  reported, not checked.

Exits 1 when any check fails; without CUDA it says so and exits 2.

``--dry-run`` runs every section on the CPU through the Triton interpreter
at toy sizes (64² images, a few per batch, tokens of width 32) and writes
``gpu-smoke-dry-run.json``: a check of this script, so that GPU time is not
spent on a bug in it; its times mean nothing and no figure comes from it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings

from bench.common import (argument_parser, copy_bandwidth_gbps, environment, pick_device, result_path, time_cuda,
                          write_result)

TOL = 1e-4


class Report:
    """The JSON document, rewritten after every section."""

    def __init__(self, path, header):
        self.path = path
        self.doc = dict(header, sections={}, failures=[])

    def section(self, name, data, failures=()):
        self.doc["sections"][name] = data
        self.doc["failures"] += [f"{name}: {f}" for f in failures]
        self.doc["ok"] = not self.doc["failures"]
        write_result(self.path, self.doc, quiet=True)
        status = "ok" if not failures else "FAILED: " + "; ".join(failures)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {status}", flush=True)


def _inputs(torch, seed, B, H, W, P, D=768, tok_dtype=None, device="cuda"):
    g = torch.Generator(device="cpu").manual_seed(seed)
    L = (H // P) * (W // P)
    images = torch.randn(B, 3, H, W, generator=g)
    # Smooth and constant regions, as in photos.
    images[:, :, : H // 2, : W // 2] = images[:, :, : H // 2, : W // 2].mean() + 0.01 * images[:, :, : H // 2, : W // 2]
    images[:, :, H - P:, W - P:] = 0.7
    tokens = torch.randn(B, L, D, generator=g)
    noise = torch.rand(B, L, generator=g)
    tokens = tokens.to(tok_dtype or torch.float32)
    return images.to(device), tokens.to(device), noise.to(device)


def _compare(torch, got, ref, noise, kw, K, energy=None):
    """The tests' comparison rule (python_ref.compare) on CPU copies; returns
    failure strings and the measured differences."""
    from python_ref.compare import compare_with_reference

    got = type(got)(*(None if t is None else t.cpu() for t in got))
    ref = type(ref)(*(None if t is None else t.cpu() for t in ref))
    res = compare_with_reference(got, ref, noise.cpu(), edge_weight=kw.get("edge_weight", 1.0), num_keep=K,
                                 sim_threshold=kw.get("sim_threshold", 0.5), tol=TOL, energy=energy)
    return res.problems, dict(edge_err=res.edge_err, redundancy_err=res.redundancy_err,
                              decided_rows=int(res.decided.sum()), rows=int(res.decided.numel()))


def _valid(sel, B, L, K):
    from python_ref.compare import selection_errors

    return not selection_errors(sel, B, L, K)


# Sizes of each section: the ViT-B/16 call on a GPU; toy ones for --dry-run.
GPU_SIZES = dict(
    res=224, D=768, compile_batch=8, check_batch=64, timing_batches=(32, 256), attribution_batch=256,
    # (B, H, W, P, options); D everywhere the same, so these compiles serve the timing section too
    agreement=[(32, 224, 224, 16, dict(token_weight=0.5)), (16, 224, 224, 14, dict(token_weight=0.5)),
               (8, 336, 336, 14, dict(token_weight=0.3, candidate_ratio=0.1)),
               (16, 224, 224, 16, dict(use_ot=False))],
)
DRY_RUN_SIZES = dict(
    res=64, D=32, compile_batch=2, check_batch=3, timing_batches=(2,), attribution_batch=2,
    agreement=[(2, 64, 64, 16, dict(token_weight=0.5)), (2, 56, 56, 14, dict(token_weight=0.5)),
               (1, 84, 84, 14, dict(token_weight=0.3, candidate_ratio=0.1)),
               (2, 64, 64, 16, dict(use_ot=False))],
)


def main(argv=None) -> int:
    ap = argument_parser(__doc__)
    ap.add_argument("--out", default=os.path.dirname(result_path("x")),
                    help="output folder (default: bench/out/, with --refresh bench/results/; "
                         "gpu-smoke-<device>.json is overwritten)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, Triton interpreter, toy sizes: checks the script, measures nothing")
    args = ap.parse_args(argv)

    if args.dry_run:
        # before Triton is imported: @triton.jit picks the interpreter then
        os.environ["TRITON_INTERPRET"] = "1"
        # numpy's warnings on the interpreter's inf/NaN lanes (a GPU computes them silently)
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    import torch

    device = torch.device("cpu") if args.dry_run else pick_device("cuda")  # no CUDA: a message, exit 2
    dev = device.type
    sz = DRY_RUN_SIZES if args.dry_run else GPU_SIZES
    import pgs_kernels
    import python_ref
    from pgs_kernels import pgs_counts, samples, triton_pgs

    env = environment(device, "gpu_smoke")
    name = "dry-run" if args.dry_run else env["device"]
    rep = Report(os.path.join(args.out, f"gpu-smoke-{name}.json"), dict(env, dry_run=args.dry_run))
    t_start = time.time()
    res, D = sz["res"], sz["D"]
    P = 16
    L = (res // P) ** 2
    kw_vit = dict(patch_size=P, token_weight=0.5)

    def inputs(seed, B, H, W, P, tok_dtype=torch.bfloat16):
        return _inputs(torch, seed, B, H, W, P, D=D, tok_dtype=tok_dtype, device=dev)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def bench(fn):
        if args.dry_run:  # do_bench needs CUDA; one timed call shows the code path works
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return time_cuda(fn, device)

    # ---- compile and load: the kernels as the launcher runs them
    try:
        images, tokens, noise = inputs(0, sz["compile_batch"], res, res, P)
        K, _, k = pgs_counts(L, 0.5, 0.05)
        t0 = time.time()
        outputs, launches = triton_pgs._launch_plan(images, tokens, noise, P, K, k, 0.5, 0.5, 1.0, True, 0.05,
                                                    20, compiled=not args.dry_run)
        kernels = []
        for kernel, grid, kargs, meta in launches:
            ck = kernel[grid](*kargs, **meta)
            if args.dry_run:  # interpreted: nothing compiled to read back
                kernels.append(dict(name=getattr(kernel, "__name__", str(kernel))))
                continue
            kernels.append(dict(name=ck.metadata.name, num_warps=ck.metadata.num_warps, n_regs=ck.n_regs,
                                n_spills=ck.n_spills, shared=ck.metadata.shared))
        sync()
        fails = [f"launch {n} spills {kk['n_spills']}" for n, kk in enumerate(kernels) if kk.get("n_spills")]
        rep.section("compile", dict(seconds=round(time.time() - t0, 1), kernels=kernels), fails)
    except Exception as exc:  # report and go on: later sections still tell something
        rep.section("compile", dict(error=repr(exc)), [repr(exc)])

    # ---- agreement with the fp64 reference
    fails, data = [], {}
    try:
        photos = torch.stack([samples.standardize(samples.photo(n, res)) for n in samples.PHOTO_NAMES[:5]])
        cases = [("photos", photos.to(dev), None, torch.rand(5, L, generator=torch.Generator().manual_seed(1)).to(dev),
                  dict(patch_size=P))]
        for seed, (B, H, W, Pc, kw) in enumerate(sz["agreement"]):
            im, tk, nz = inputs(10 + seed, B, H, W, Pc)
            cases.append((f"random-{H}/{Pc}-{kw}", im, tk, nz, dict(patch_size=Pc, **kw)))
        for name, im, tk, nz, kw in cases:
            got = pgs_kernels.pgs_select(im, tk, noise=nz, backend="triton", return_scores=True, **kw)
            ref = python_ref.pgs_select(im.float(), tk.float() if tk is not None and kw.get("token_weight", 0) else None,
                                        noise=nz, return_scores=True, **kw)
            L = nz.shape[1]
            Kc, _, _ = pgs_counts(L, kw.get("mask_ratio", 0.5), kw.get("candidate_ratio", 0.05))
            energy = python_ref.patch_sobel_energy(im.double().cpu(), kw["patch_size"])
            f, d = _compare(torch, got, ref, nz, kw, Kc, energy)
            data[name] = d
            fails += [f"{name}: {x}" for x in f]
    except Exception as exc:
        fails.append(repr(exc))
    rep.section("agreement", data, fails)

    # ---- determinism, invariants, layouts
    fails, data = [], {}
    try:
        Bc = sz["check_batch"]
        im, tk, nz = inputs(20, Bc, res, res, P)
        a = pgs_kernels.pgs_select(im, tk, noise=nz, backend="triton", return_scores=True, **kw_vit)
        b = pgs_kernels.pgs_select(im, tk, noise=nz, backend="triton", return_scores=True, **kw_vit)
        same = all(torch.equal(x.nan_to_num(), y.nan_to_num()) for x, y in zip(a, b))
        data["determinism"] = same
        if not same:
            fails.append("two calls differ")
        bad = {}
        K, _, _ = pgs_counts(L, 0.5, 0.05)
        for what in ("images_nan", "images_inf", "tokens_nan", "tokens_inf", "noise_nan"):
            im2, tk2, nz2 = im.clone(), tk.clone(), nz.clone()
            t = {"images": im2, "tokens": tk2, "noise": nz2}[what.split("_")[0]]
            t.view(-1)[:: max(1, t.numel() // 97)] = math.nan if what.endswith("nan") else math.inf
            t[0] = math.nan if what.endswith("nan") else math.inf
            for ot in (True, False):
                s = pgs_kernels.pgs_select(im2, tk2, noise=nz2, backend="triton", use_ot=ot, **kw_vit)
                ok = _valid(s, Bc, L, K)
                bad[f"{what}-ot{int(ot)}"] = ok
                if not ok:
                    fails.append(f"invalid selection with {what}, use_ot={ot}")
        data["invariants"] = bad
        cl = im.to(memory_format=torch.channels_last)
        big = torch.zeros(Bc, 4, res + 16, res + 8, device=dev)
        big[:, :3, 8:8 + res, 4:4 + res] = im
        sliced = big[:, :3, 8:8 + res, 4:4 + res]
        tok_t = tk.transpose(1, 2).contiguous().transpose(1, 2)
        lay = {}
        for name, (x, t) in {"channels_last": (cl, tk), "sliced": (sliced, tok_t)}.items():
            g = pgs_kernels.pgs_select(x, t, noise=nz, backend="triton", return_scores=True, **kw_vit)
            f, d = _compare(torch, g, a, nz, kw_vit, K)
            lay[name] = d
            fails += [f"{name}: {x}" for x in f]
        data["layouts"] = lay
    except Exception as exc:
        fails.append(repr(exc))
    rep.section("checks", data, fails)

    # ---- timing against the bandwidth floor measured here
    fails, data = [], {}
    try:
        K, _, k = pgs_counts(L, 0.5, 0.05)
        for B in sz["timing_batches"]:
            im, tk, nz = inputs(30, B, res, res, P)
            ms = bench(lambda: pgs_kernels.pgs_select(im, tk, noise=nz, backend="triton", **kw_vit))
            n_read = im.numel() * im.element_size() + tk.numel() * tk.element_size() + nz.numel() * 4
            # keep_idx, mask, edge, candidates, redundancy
            n_write = B * (K * 8 + L + L * 4 + k * 8 + L * 4)
            gbps = copy_bandwidth_gbps(device, n_read, timer=bench)  # a copy of the bytes the call reads
            copy_ms = 2 * n_read / (gbps * 1e9) * 1e3
            floor_ms = (n_read + n_write) / (gbps * 1e9) * 1e3
            data[f"batch{B}"] = dict(median_ms=round(ms, 4), copy_ms=round(copy_ms, 4),
                                     copy_gbps=round(gbps, 1), bandwidth_floor_ms=round(floor_ms, 4),
                                     over_floor=round(ms / floor_ms, 2), us_per_image=round(ms * 1e3 / B, 3))

        variants = {"full": kw_vit, "no_ot": dict(kw_vit, use_ot=False),
                    "tokens_only": dict(kw_vit, token_weight=1.0), "pixels_only": dict(kw_vit, token_weight=0.0),
                    "no_candidates": dict(kw_vit, candidate_ratio=0.0)}
        Ba = sz["attribution_batch"]
        im, tk, nz = inputs(31, Ba, res, res, P)
        att = {}
        for variant, kw in variants.items():
            att[variant] = round(bench(lambda: pgs_kernels.pgs_select(im, tk, noise=nz, backend="triton", **kw)), 4)
        data[f"attribution_batch{Ba}_ms"] = att
        if "batch256" in data:
            # A target, not a check: reported, never a failure.
            data["target_batch256_le_0.2ms"] = data["batch256"]["median_ms"] <= 0.2
    except Exception as exc:
        fails.append(repr(exc))
    data["seconds_so_far"] = round(time.time() - t_start, 1)
    rep.section("timing", data, fails)
    print(json.dumps(rep.doc["sections"].get("timing", {}), indent=1))
    print(f"gpu_smoke: {'ok' if rep.doc['ok'] else 'FAILED'} in {time.time() - t_start:.0f} s -> {rep.path}")
    return 0 if rep.doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
