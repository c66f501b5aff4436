"""``python_ref.published_pgs`` side by side with the published CLIP-PGS code.

The published code (class ``PatchDropout_PGS`` of the authors' open_clip
fork) is imported from a checkout given on the command line; nothing of it
is part of this project. Two modes:

``--fixture``
    Runs the published code once on a fixed set of inputs and stores what it
    computed, step by step, in ``tests/data/published_official.npz`` with a
    ``README.md`` beside it (how, where and with what it was produced). The
    inputs are the images stored in that file whenever it exists
    (``fixture_bank``); only without it is a new image bank generated.
    ``tests/test_published.py`` replays the stored edge priors and noise
    draws through the port's steps and compares the outcome exactly.

``--compare``
    Counts the cases (photos and synthetic scenes) in which the port keeps
    exactly the patches the published code keeps, for the port before and
    after it was made faithful and with each of the three decisive details
    reverted one at a time; records the published keep count against the
    batch size, and whether the published candidates depend on the noise.
    Writes ``bench/out/published-vs-official.json`` (``bench/results/`` with
    ``--refresh``).

Usage::

    git clone https://github.com/PGSmall/clip-pgs /tmp/clip-pgs
    python -m bench.published_fixture --official /tmp/clip-pgs --fixture
    python -m bench.published_fixture --official /tmp/clip-pgs --compare

Both draw the noise the way a training step does: ``torch.manual_seed`` and
then the published code's own ``torch.rand`` calls (recorded), and feed the
same draws to the port.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import types
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from bench.common import argument_parser, result_path
from bench.retention import load_photo, load_photos
from pgs_kernels import samples as scenes
from python_ref import published as pub
from python_ref.pgs import patchify as patchify_cpq

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DATA = os.path.join(_ROOT, "tests", "data")
FIXTURE = os.path.join(DATA, "published_official.npz")
RESULTS_NAME = "published-vs-official.json"

L = 196  # 224 / 16 squared: the published code patchifies with 16
PATCH = 16
CANDIDATE_RATIO = 0.05  # the published patch-dropout probability
SIM_THRESHOLD = 0.5  # the published target_mask_ratio
TOKEN_DIM = 16



# --------------------------------------------------------------------------
# The published code, imported from outside the project
# --------------------------------------------------------------------------

def load_official(root: str):
    """Import ``open_clip/transformer.py`` of the checkout at ``root`` without
    running its package ``__init__`` (which needs the whole training stack);
    ``torchvision``, imported by a module it needs but unused by the class, is
    stubbed if absent. Returns the ``PatchDropout_PGS`` class."""
    pkg_dir = os.path.join(root, "open_clip")
    if not os.path.isfile(os.path.join(pkg_dir, "transformer.py")):
        raise SystemExit(f"--official: {root} has no open_clip/transformer.py")
    if importlib.util.find_spec("torchvision") is None and "torchvision" not in sys.modules:
        tv, ops, misc = (types.ModuleType(n) for n in ("torchvision", "torchvision.ops", "torchvision.ops.misc"))
        misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (), {})
        tv.ops, ops.misc = ops, misc
        sys.modules.update({"torchvision": tv, "torchvision.ops": ops, "torchvision.ops.misc": misc})
    pkg = types.ModuleType("open_clip")
    pkg.__path__ = [pkg_dir]
    sys.modules["open_clip"] = pkg
    return importlib.import_module("open_clip.transformer").PatchDropout_PGS


def git_commit(path: str) -> Optional[str]:
    try:
        return subprocess.check_output(["git", "-C", path, "rev-parse", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


@contextlib.contextmanager
def _recording():
    """Record what ``torch.rand``, ``torch.argsort`` and ``torch.allclose``
    return while the published code runs (it calls them through ``torch``)."""
    rec: Dict[str, list] = {"rand": [], "argsort": [], "allclose": []}
    saved = torch.rand, torch.argsort, torch.allclose

    def wrap(name, f):
        def g(*a, **kw):
            out = f(*a, **kw)
            rec[name].append(out.clone() if isinstance(out, torch.Tensor) else bool(out))
            return out
        return g

    torch.rand, torch.argsort, torch.allclose = (wrap(n, f) for n, f in zip(("rand", "argsort", "allclose"), saved))
    try:
        yield rec
    finally:
        torch.rand, torch.argsort, torch.allclose = saved


def _divisions(allclose_results: List[bool]) -> int:
    """Sinkhorn iterations that divided, from the sequence of stop tests (the
    second test of an iteration only runs when the first passed)."""
    it, n = iter(allclose_results), 0
    for first in it:
        if first and next(it, False):
            break
        n += 1
    return n


def run_official(cls, images: torch.Tensor, tokens: torch.Tensor, *, seed: int, mask_ratio: float,
                 token_weight: float, candidate_ratio: float = CANDIDATE_RATIO,
                 sim_threshold: float = SIM_THRESHOLD) -> Dict:
    """One training-mode call of the published module with edge prior and
    Sinkhorn on (the published configuration), after ``torch.manual_seed(seed)``.

    Returns its noise draws ``u``, ``u2``, edge prior ``b``, similarity ``S``
    (after ``S + SK(S)``), Sinkhorn divisions, candidates, similar set, keep
    count ``Kp``, kept patches ``keep`` (in its order) and attention mask.
    """
    B = images.shape[0]
    mod = cls(candidate_ratio)
    mod.train()
    seen: Dict = {}
    edge_fn, gen_fn = mod.get_boundary_mask_from_sobel, mod.generate_mask

    def edge(imgs):
        seen["b"] = edge_fn(imgs).clone()
        return seen["b"]

    def generate(x, sim, *rest):
        mask, attn = gen_fn(x, sim, *rest)
        seen["S"], seen["similar"] = sim.clone(), mask.clone() != 0
        return mask, attn

    mod.get_boundary_mask_from_sobel, mod.generate_mask = edge, generate
    x = torch.cat([torch.zeros(B, 1, tokens.shape[2]), tokens.float()], dim=1)
    torch.manual_seed(seed)
    with _recording() as rec:
        out, attn, _ = mod(x, images, sim_threshold, mask_ratio, token_weight * 32, True, True)
    assert len(rec["rand"]) == 2 and len(rec["argsort"]) == 2, "unexpected published call sequence"
    Kp = out.shape[1] - 1
    k = L - int(L * (1 - candidate_ratio))
    keep = rec["argsort"][1][:, :Kp]
    assert torch.equal(out[:, 1:], torch.gather(x[:, 1:], 1, keep[..., None].expand(-1, -1, x.shape[2])))
    return {"u": rec["rand"][0], "u2": rec["rand"][1], "b": seen["b"], "S": seen["S"],
            "sk_divisions": _divisions(rec["allclose"]), "cand": rec["argsort"][0][:, L - k:],
            "similar": seen["similar"], "Kp": Kp, "keep": keep, "attn": attn}


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------

def clip_normalize(u8: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` uint8 -> float32 CLIP input; elementwise, so the same
    uint8 image gives the same float input anywhere."""
    return scenes.clip_normalize(u8.float() / 255.0)


def to_u8(display: np.ndarray) -> np.ndarray:
    """(H, W, 3) float in [0, 1] -> (3, H, W) uint8."""
    return np.round(np.clip(display, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(2, 0, 1).copy()


def blocks_scene(seed: int, size: int = 224) -> np.ndarray:
    """A noise-free scene of flat rectangles on a flat background (uint8):
    constant patches, the case where the standardized vectors are 0/0."""
    rng = np.random.default_rng(seed)
    img = np.empty((3, size, size), dtype=np.uint8)
    img[:] = rng.integers(0, 256, size=3, dtype=np.uint8)[:, None, None]
    for _ in range(int(rng.integers(2, 6))):
        y0, x0 = rng.integers(0, size - 32, size=2)
        h, w = rng.integers(16, 96, size=2)
        img[:, y0:y0 + h, x0:x0 + w] = rng.integers(0, 256, size=3, dtype=np.uint8)[:, None, None]
    return img


def make_tokens(images: torch.Tensor, seed: int) -> torch.Tensor:
    """Stand-ins for patch embeddings: a random projection of each patch plus
    a random position embedding, ``(B, L, TOKEN_DIM)``, rounded to float16 so
    that the stored values are the inputs."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(3 * PATCH * PATCH, TOKEN_DIM, generator=g) / (3 * PATCH * PATCH) ** 0.5
    pos = 0.5 * torch.randn(L, TOKEN_DIM, generator=g)
    return (pub.patchify_pqc(images, PATCH) @ proj + pos).half()


# --------------------------------------------------------------------------
# --fixture
# --------------------------------------------------------------------------

FIXTURE_PHOTOS = ("camera", "coins", "clock", "moon", "rocket", "hubble_deep_field", "astronaut")
FIXTURE_SCENES = (0, 1, 2, 5)  # pgs_kernels.samples.make_scene seeds: all three backgrounds
FIXTURE_BLOCKS = (0, 1)


def generate_bank():
    """A new image bank from today's photo and scene code: ``(names, (N, 3,
    224, 224) uint8)``. Not the stored one: ``samples.photo`` centre-crops a
    non-square photo to a square before resizing it (since 9b6ae9c), while the
    stored bank (e2b3e3b, ``bench/scenes.load_photo``) squashed the whole photo,
    so coins, clock, rocket and hubble_deep_field come out up to 243 grey
    levels apart. Used only where no fixture file exists."""
    names, imgs = [], []
    for n in FIXTURE_PHOTOS:
        names.append(f"photo:{n}")
        imgs.append(to_u8(load_photo(n)[1]))
    for s in FIXTURE_SCENES:
        scene = scenes.make_scene(s)
        names.append(f"scene:{s}:{scene['background']}")
        imgs.append(to_u8(scene["display"]))
    for s in FIXTURE_BLOCKS:
        names.append(f"blocks:{s}")
        imgs.append(blocks_scene(s))
    return names, np.stack(imgs)


def stored_bank(path: str = FIXTURE):
    """``(names, images_u8, what generated them)`` as stored in a fixture file."""
    with np.load(path) as z:
        meta = json.loads(str(z["meta_json"]))
        bank = z["images_u8"].copy()
    made = meta.get("images_from") or f"bench/published_fixture.py at project commit {meta['project_commit']}"
    return meta["image_names"], bank, made


def fixture_bank(path: Optional[str] = FIXTURE):
    """The fixture's images, ``(names, (N, 3, 224, 224) uint8)``: the stored
    ``images_u8`` of the fixture file at ``path`` whenever it exists, so that
    ``--fixture`` feeds the published code the inputs the stored outputs were
    computed from, whatever has changed since in the photo or scene code; a
    new bank (``generate_bank``) only where there is no file."""
    if path is None or not os.path.exists(path):
        return generate_bank()
    names, bank, _ = stored_bank(path)
    want = ([f"photo:{n}" for n in FIXTURE_PHOTOS] + [f"scene:{s}:" for s in FIXTURE_SCENES]
            + [f"blocks:{s}" for s in FIXTURE_BLOCKS])
    if len(names) != len(want) or not all(n == w or (w.endswith(":") and n.startswith(w))
                                          for n, w in zip(names, want)):
        raise SystemExit(f"{path} stores the images {names}, not the bank FIXTURE_PHOTOS, FIXTURE_SCENES and "
                         "FIXTURE_BLOCKS name: to make a fixture on a new bank, delete the file first")
    if bank.dtype != np.uint8 or bank.shape != (len(names), 3, 224, 224):
        raise SystemExit(f"{path}: images_u8 is {bank.dtype} {bank.shape}, not uint8 ({len(names)}, 3, 224, 224)")
    return names, bank


def fixture_cases(n_images: int):
    """(image indices, mask_ratio, token_weight) per case; the seed is the case
    number + 1000."""
    P = list(range(len(FIXTURE_PHOTOS)))
    S = list(range(len(FIXTURE_PHOTOS), len(FIXTURE_PHOTOS) + len(FIXTURE_SCENES)))
    everything = list(range(n_images))
    cases = [([i], 0.5, 0.0) for i in everything]
    cases += [([i], 0.75, 0.5) for i in everything]
    cases += [([i], 0.75, 0.0) for i in (P[0], P[4], S[0], S[2])]
    cases += [([P[0], S[0]], 0.5, 0.0), ([P[1], P[2]], 0.75, 0.25)]
    cases += [(P[:4], 0.5, 0.0), (S[:4], 0.75, 0.5)]
    cases += [(P[2:6] + S[:2] + [everything[-1], everything[-2]], 0.5, 0.5)]
    cases += [(everything, 0.75, 0.0)]
    return cases


def sort_probe():
    """Key rows with ties whose default ``argsort`` order the test compares
    with its own: same order, same tie breaking."""
    g = torch.Generator().manual_seed(7)
    keys = torch.cat([torch.zeros(1, L), (torch.rand(3, L, generator=g) * 4).floor(),
                      (torch.rand(2, L, generator=g) < 0.3).float() * torch.rand(2, L, generator=g)])
    return keys, torch.argsort(keys, dim=1)


def cpu_info() -> Dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "avx512f", "avx512bw", "avx512vl") if f in flags]
    return {"model": model, "simd_flags": simd, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def write_fixture(cls, official_root: str) -> None:
    if os.path.exists(FIXTURE):
        names, bank = fixture_bank(FIXTURE)
        images_from = stored_bank(FIXTURE)[2]
        print(f"inputs: the {len(names)} images stored in {FIXTURE} (made by {images_from})")
    else:
        names, bank = generate_bank()
        images_from = f"bench/published_fixture.py at project commit {git_commit(_ROOT)}"
        print(f"inputs: no {FIXTURE}, so a NEW image bank from today's photo and scene code ({len(names)} images)")
    images_all = clip_normalize(torch.from_numpy(bank))
    cases = fixture_cases(len(names))
    cols: Dict[str, list] = {k: [] for k in ("img", "u", "u2", "b", "cand", "rows", "similar", "keep")}
    meta_cases, tokens_all = [], []
    for c, (idx, mr, tw) in enumerate(cases):
        x = images_all[idx]
        tok = make_tokens(x, seed=2000 + c)
        o = run_official(cls, x, tok, seed=1000 + c, mask_ratio=mr, token_weight=tw)
        B, k = o["cand"].shape
        keep = torch.full((B, L), -1, dtype=torch.int64)
        keep[:, :o["Kp"]] = o["keep"]
        rows = torch.gather(o["S"], 1, o["cand"][..., None].expand(B, k, L))
        for key, val in (("img", torch.tensor(idx)), ("u", o["u"]), ("u2", o["u2"]), ("b", o["b"]),
                         ("cand", o["cand"]), ("rows", rows), ("similar", o["similar"]), ("keep", keep)):
            cols[key].append(val)
        if tw > 0:
            tokens_all.append(tok)
        meta_cases.append({"images": [names[i] for i in idx], "mask_ratio": mr, "token_weight": tw,
                           "seed": 1000 + c, "keep_count": o["Kp"], "sk_divisions": o["sk_divisions"],
                           "has_tokens": tw > 0})
        print(f"case {c:2d}: B={B:2d} mask_ratio={mr} token_weight={tw} K'={o['Kp']:3d} "
              f"sk_divisions={o['sk_divisions']}")
    probe_keys, probe_order = sort_probe()
    meta = {
        "official_repo": "https://github.com/PGSmall/clip-pgs",
        "official_commit": git_commit(official_root),
        "official_class": "open_clip/transformer.py: PatchDropout_PGS (patchify: open_clip/utils.py)",
        "published_call": {"prob": CANDIDATE_RATIO, "target_mask_ratio": SIM_THRESHOLD, "use_ed": True,
                           "use_otn": True, "min_mask_ratio": "mask_ratio", "epoch": "32 * token_weight"},
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu": cpu_info(),
        "date": datetime.date.today().isoformat(),
        "project_commit": git_commit(_ROOT),
        "image_names": names,
        "images_from": images_from,
        "cases": meta_cases,
    }
    arrays = {
        "images_u8": bank,
        "case_offsets": np.cumsum([0] + [len(c[0]) for c in cases]),
        "case_images": torch.cat(cols["img"]).numpy().astype(np.int16),
        "u": torch.cat(cols["u"]).numpy(),
        "u2": torch.cat(cols["u2"]).numpy(),
        "b": torch.cat(cols["b"]).numpy(),
        "candidates": torch.cat(cols["cand"]).numpy().astype(np.int16),
        "candidate_rows": torch.cat(cols["rows"]).numpy(),
        "similar": torch.cat(cols["similar"]).numpy(),
        "keep": torch.cat(cols["keep"]).numpy().astype(np.int16),
        "tokens": torch.cat(tokens_all).numpy(),
        "sort_probe_keys": probe_keys.numpy(),
        "sort_probe_order": probe_order.numpy().astype(np.int16),
        "meta_json": np.array(json.dumps(meta)),
    }
    os.makedirs(DATA, exist_ok=True)
    np.savez_compressed(FIXTURE, **arrays)
    write_readme(meta)
    print(f"wrote {FIXTURE} ({os.path.getsize(FIXTURE) / 1e6:.2f} MB) and README.md")


def write_readme(meta: Dict) -> None:
    cpu = meta["cpu"]
    text = f"""# published_official.npz

What the published CLIP-PGS selection computed, step by step, on fixed
inputs; `tests/test_published.py` replays it through `python_ref.published`.

## How it was produced

`python -m bench.published_fixture --official <checkout> --fixture`, with
the published code imported from a checkout of {meta['official_repo']}
at commit `{meta['official_commit']}` ({meta['official_class']}; the
checkout is not part of this project);
torch {meta['torch']}, numpy {meta['numpy']}, one thread, on
{cpu['model']} (SIMD: {', '.join(cpu['simd_flags']) or 'none'}; torch CPU
capability {cpu['torch_cpu_capability']}); {meta['date']}; project commit
`{meta['project_commit']}`.

Each of the {len(meta['cases'])} cases is one call of the published module
in training mode with the published configuration (`prob = {CANDIDATE_RATIO}`,
`target_mask_ratio = {SIM_THRESHOLD}`, `use_ed`, `use_otn`,
`min_mask_ratio = mask_ratio`, `epoch = 32 * token_weight`) after
`torch.manual_seed(seed)`, batch sizes 1 to {max(len(c['images']) for c in meta['cases'])},
mask ratios 0.5 and 0.75, token weights 0, 0.25 and 0.5. `meta_json` lists
the cases (images, mask ratio, token weight, seed, keep count, Sinkhorn
divisions) and this provenance.

## What is in it

- `images_u8`: {len(meta['image_names'])} images, 224 x 224, uint8 (names in
  `meta_json`), made by {meta['images_from']}:
  scikit-image photos resized by area, synthetic scenes of
  `pgs_kernels/samples.py` (`make_scene(seed)`) and noise-free flat-rectangle scenes.
  They are the bank's source: `--fixture` reads them from this file whenever
  it exists (`fixture_bank()`, checked by `tests/test_bench_scripts.py`) and
  generates a new bank only where it does not, so a new run feeds the
  published code these inputs even where the photo or scene code has changed
  (a bank made before 9b6ae9c holds photos squashed whole to 224 x 224;
  `samples.photo` now centre-crops a non-square photo first).
  They are fed as `(x / 255 - mean) / std` with CLIP's per-channel
  constants, an elementwise computation that gives the same floats anywhere.
- `tokens`: float16 stand-ins for patch embeddings (a random projection of
  each patch plus a random position embedding), for the cases with
  `token_weight > 0`, in case order.
- Per image of every case (rows `case_offsets[c]:case_offsets[c+1]`,
  `case_images` the image of each row): `u`, `u2` the two noise draws
  (recorded from its `torch.rand` calls), `b` its edge prior, `candidates`
  (in its order), `candidate_rows` the rows of its `S + SK(S)` at the
  candidates, `similar` its similar set, `keep` its kept patches in its
  order (`-1` padded to 196).
- `sort_probe_keys`, `sort_probe_order`: rows with ties and their default
  `torch.argsort` order here; the test compares tie-dependent orders only
  where its sort breaks these ties the same way.

## Why the test feeds stored values to the later steps

The edge prior is the rounding noise of the standardized patch means: it
changes with the machine's SIMD width and even with the batch shape. The
division-based Sinkhorn amplifies the rounding of the similarity (a relative
change of 1e-7 moves entries of `S + SK(S)` by up to thousands), so the
similar set is machine-dependent too. The test therefore takes `b`, `u`,
`u2` and `candidate_rows` from here and requires the stored candidates,
similar set, keep count and kept patches exactly; it compares the port's own
`b`, similarity and whole call with the stored ones only where the machine
running it rounds the same way.
"""
    with open(os.path.join(DATA, "README.md"), "w") as f:
        f.write(text)


# --------------------------------------------------------------------------
# --compare
# --------------------------------------------------------------------------

def load_old_port(rev: str):
    """``python_ref/published.py`` at git revision ``rev``, as a module."""
    src = subprocess.check_output(["git", "-C", _ROOT, "show", f"{rev}:python_ref/published.py"], text=True)
    name = "python_ref._published_at_" + rev.replace("/", "_").replace("~", "_").replace("^", "_")
    mod = types.ModuleType(name)
    mod.__package__ = "python_ref"
    exec(compile(src, f"{rev}:python_ref/published.py", "exec"), mod.__dict__)
    return mod


def port_variant(images, tokens, u, u2, mask_ratio, token_weight, *, patchify=pub.patchify_pqc,
                 sinkhorn=pub.sinkhorn_knopp_division, stable=False):
    """The port's steps with one detail swapped; returns (kept (B, K') sorted, candidates)."""
    K, _, k = pub.pgs_counts(L, mask_ratio, CANDIDATE_RATIO)
    z = pub.standardize_patches(patchify(images, PATCH))
    b = pub.published_edge_prior(z, 14, 14)
    S = pub.published_similarity(z, tokens, token_weight)
    S = S + sinkhorn(S, 50)
    cand = torch.argsort(u + b * pub.EDGE_SCALE, dim=1, stable=stable)[:, L - k:]
    similar = pub.similar_set(S, cand, SIM_THRESHOLD)
    Kp = pub.published_keep_count(similar, b, K)
    key = torch.exp(u2) * similar.float()
    keep = torch.argsort(key, dim=1, stable=stable)[:, :Kp]
    return torch.sort(keep, dim=1).values, cand


def compare_batches(max_scenes: int, seeds: Sequence[int]):
    """(kind, tag, images (B,3,224,224), mask_ratio, token_weight, seed) over
    photos and synthetic scenes at several batch sizes."""
    photos, _ = load_photos(scenes.PHOTO_NAMES)
    n = photos.shape[0]
    for B in (1, 2, 5, 10):
        for s in seeds:
            for mr in (0.5, 0.75):
                for tw in (0.0, 0.5):
                    for i in range(0, n, B):
                        yield "photos", B, photos[i:i + B], mr, tw, 100 * s + i
    per = max(1, max_scenes // 4)
    bi = 0
    for q, B in enumerate((1, 4, 16, 64)):
        seeds_q = list(range(q * per, (q + 1) * per))
        for i in range(0, len(seeds_q), B):
            chunk = seeds_q[i:i + B]
            x = torch.stack([scenes.make_scene(s)["image"] for s in chunk])
            yield "scenes", B, x, (0.5, 0.75)[bi % 2], (0.0, 0.5)[(bi // 2) % 2], 5000 + bi
            bi += 1


def compare(cls, official_root: str, old_rev: str, max_scenes: int, seeds: Sequence[int]) -> Dict:
    old = load_old_port(old_rev)
    variants = {
        "new_port": lambda x, t, u, u2, mr, tw: pub.published_pgs(
            x, t, noise=u, keep_noise=u2, mask_ratio=mr, token_weight=tw).keep_idx,
        "old_port": lambda x, t, u, u2, mr, tw: _old_call(old, x, t, u, u2, mr, tw),
        "new_with_cpq_order": lambda *a: port_variant(*a, patchify=patchify_cpq)[0],
        "new_with_old_sinkhorn": lambda *a: port_variant(*a, sinkhorn=old.sinkhorn_knopp_division)[0],
        "new_with_stable_sorts": lambda *a: port_variant(*a, stable=True)[0],
        "new_with_all_three_reverted": lambda *a: port_variant(
            *a, patchify=patchify_cpq, sinkhorn=old.sinkhorn_knopp_division, stable=True)[0],
    }
    match = {k: {v: {"images": 0, "batches": 0} for v in variants} for k in ("photos", "scenes")}
    totals = {k: {"images": 0, "batches": 0} for k in ("photos", "scenes")}
    attn_equal = {"new_port": 0, "batches": 0}
    keep_counts: Dict = {}
    sk_div: Dict = {}
    tie_decided = {"images": 0, "of": 0}
    old_is_three = {"images": 0, "of": 0}
    for kind, batch, x, mr, tw, seed in compare_batches(max_scenes, seeds):
        B = x.shape[0]
        t = make_tokens(x, seed).float()
        o = run_official(cls, x, t, seed=seed, mask_ratio=mr, token_weight=tw)
        ref = torch.sort(o["keep"], dim=1).values
        totals[kind]["images"] += B
        totals[kind]["batches"] += 1
        outs = {}
        for name, f in variants.items():
            got = outs[name] = f(x, t, o["u"], o["u2"], mr, tw)
            same_rows = (got.shape == ref.shape) and (got == ref).all(dim=1)
            n_same = int(same_rows.sum()) if got.shape == ref.shape else 0
            match[kind][name]["images"] += n_same
            match[kind][name]["batches"] += int(n_same == B)
        a, r = outs["old_port"], outs["new_with_all_three_reverted"]
        old_is_three["images"] += int((a == r).all(dim=1).sum()) if a.shape == r.shape else 0
        old_is_three["of"] += B
        sel, attn = pub.published_pgs(x, t, noise=o["u"], keep_noise=o["u2"], mask_ratio=mr, token_weight=tw,
                                      return_attn_mask=True)
        attn_equal["batches"] += 1
        if torch.equal(sel.keep_idx, ref):
            # the published mask is in its keep order; put it in ascending order
            pos = torch.argsort(o["keep"], dim=1) + 1
            pos = torch.cat([torch.zeros(B, 1, dtype=pos.dtype), pos], dim=1)
            pub_sorted = torch.gather(torch.gather(o["attn"], 1, pos[:, :, None].expand(-1, -1, pos.shape[1])),
                                      2, pos[:, None, :].expand(-1, pos.shape[1], -1))
            attn_equal["new_port"] += int(torch.equal(pub_sorted, attn))
        if tw == 0.0:
            kc = keep_counts.setdefault(kind, {}).setdefault(str(mr), {}).setdefault(str(batch), [])
            kc.append(o["Kp"])
        sk_div[o["sk_divisions"]] = sk_div.get(o["sk_divisions"], 0) + 1
        n_nonsimilar = (~o["similar"]).sum(dim=1)
        tie_decided["images"] += int((n_nonsimilar > o["Kp"]).sum())
        tie_decided["of"] += B
    return {"match": match, "totals": totals, "attn_mask_equal": attn_equal, "keep_counts_raw": keep_counts,
            "sk_divisions_histogram": {str(k): v for k, v in sorted(sk_div.items())},
            "kept_set_decided_by_sort_ties": tie_decided,
            "old_port_keeps_what_new_with_all_three_reverted_keeps": old_is_three}


def _old_call(old, x, t, u, u2, mr, tw):
    """The old port draws its second noise itself (one ``torch.rand`` call):
    answer that call with the recorded ``u2``."""
    saved = torch.rand

    def rand(*a, **kw):
        return u2.to(kw.get("dtype") or torch.float32).clone()

    torch.rand = rand
    try:
        return old.published_pgs(x, t, noise=u, mask_ratio=mr, token_weight=tw).keep_idx
    finally:
        torch.rand = saved


def keep_count_vs_batch(cls, n_scenes: int) -> Dict:
    """The published keep count K' at batch sizes 1..64 (token weight 0), min
    / median / max over batches: synthetic scenes, photos normalized per image
    (as in bench/retention.py) and with CLIP's constants (as in the fixture)."""
    xs = torch.stack([scenes.make_scene(10_000 + s)["image"] for s in range(n_scenes)])
    photos, _ = load_photos(scenes.PHOTO_NAMES)
    photos_clip = clip_normalize(torch.from_numpy(np.stack([to_u8(load_photo(n)[1])
                                                            for n in scenes.PHOTO_NAMES])))
    out: Dict = {}
    for kind, X, sizes in (("scenes", xs, (1, 2, 4, 8, 16, 32, 64)), ("photos", photos, (1, 2, 5, 10)),
                           ("photos_clip_normalized", photos_clip, (1, 2, 5, 10))):
        for mr in (0.5, 0.75):
            K = pub.pgs_counts(L, mr, CANDIDATE_RATIO)[0]
            rows = {}
            for B in sizes:
                if B > X.shape[0]:
                    continue
                counts = []
                for i in range(0, X.shape[0] - B + 1, B):
                    x = X[i:i + B]
                    o = run_official(cls, x, make_tokens(x, i).float(), seed=7000 + i + B, mask_ratio=mr,
                                     token_weight=0.0)
                    counts.append(o["Kp"])
                c = np.array(counts)
                rows[str(B)] = {"batches": len(counts), "min": int(c.min()), "median": float(np.median(c)),
                                "max": int(c.max()), "mean": float(c.mean())}
            out.setdefault(kind, {})[str(mr)] = {"K": K, "by_batch": rows}
    return out


def candidates_vs_noise(cls, n_scenes: int, draws: int) -> Dict:
    """Per image (batch 1): are the published candidates the same set under
    ``draws`` different noise draws? Also the kept set; and are an image's
    candidates the same alone and in one batch with all the others (its
    edge prior's rounding depends on the batch shape)?"""
    xs = torch.stack([scenes.make_scene(20_000 + s)["image"] for s in range(n_scenes)])
    photos, _ = load_photos(scenes.PHOTO_NAMES)
    out = {}
    for kind, X in (("scenes", xs), ("photos", photos)):
        same_cand = same_keep = 0
        for i in range(X.shape[0]):
            x = X[i:i + 1]
            t = make_tokens(x, i).float()
            runs = [run_official(cls, x, t, seed=31 * d + i, mask_ratio=0.5, token_weight=0.0) for d in range(draws)]
            cands = [set(r["cand"][0].tolist()) for r in runs]
            keeps = [set(r["keep"][0].tolist()) for r in runs]
            same_cand += int(all(c == cands[0] for c in cands))
            same_keep += int(all(c == keeps[0] for c in keeps))
        whole = run_official(cls, X, make_tokens(X, 0).float(), seed=99, mask_ratio=0.5, token_weight=0.0)
        alone = [set(run_official(cls, X[i:i + 1], make_tokens(X[i:i + 1], i).float(), seed=99, mask_ratio=0.5,
                                  token_weight=0.0)["cand"][0].tolist()) for i in range(X.shape[0])]
        same_batch = sum(int(set(whole["cand"][i].tolist()) == alone[i]) for i in range(X.shape[0]))
        out[kind] = {"images": X.shape[0], "noise_draws": draws, "same_candidates_every_draw": same_cand,
                     "same_kept_set_every_draw": same_keep,
                     "same_candidates_alone_and_in_one_batch_of_all": same_batch}
    return out


def sinkhorn_sensitivity(n_scenes: int) -> Dict:
    """How much the published ``S + SK(S)`` moves when ``S`` changes by a
    relative 1e-7 (rounding of another GEMM), per image at batch 1: the
    largest entry change, and in how many images the similar set (at the
    same candidates) changes."""
    photos, _ = load_photos(scenes.PHOTO_NAMES)
    xs = torch.cat([torch.stack([scenes.make_scene(30_000 + s)["image"] for s in range(n_scenes)]), photos])
    g = torch.Generator().manual_seed(0)
    k = L - int(L * (1 - CANDIDATE_RATIO))
    moved, changed = [], 0
    for i in range(xs.shape[0]):
        z = pub.standardize_patches(pub.patchify_pqc(xs[i:i + 1], PATCH))
        b = pub.published_edge_prior(z, 14, 14)
        S = pub.published_similarity(z, None, 0.0)
        S2 = S * (1 + 1e-7 * torch.randn(S.shape, generator=g))
        T, T2 = S + pub.sinkhorn_knopp_division(S), S2 + pub.sinkhorn_knopp_division(S2)
        cand = pub.published_candidates(b, torch.rand(1, L, generator=g), k)
        moved.append(float((T2 - T).abs().max()))
        same = torch.equal(pub.similar_set(T, cand, SIM_THRESHOLD), pub.similar_set(T2, cand, SIM_THRESHOLD))
        changed += int(not same)
    m = np.array(moved)
    return {"images": len(moved), "relative_perturbation": 1e-7, "max_entry_change_median": float(np.median(m)),
            "max_entry_change_max": float(m.max()), "images_whose_similar_set_changes": changed}


def main(argv=None) -> None:
    ap = argument_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True, help="path to a checkout of PGSmall/clip-pgs")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--fixture", action="store_true", help="write tests/data/published_official.npz")
    mode.add_argument("--compare", action="store_true",
                      help=f"write bench/out/{RESULTS_NAME} (with --refresh bench/results/{RESULTS_NAME})")
    ap.add_argument("--old-rev", default="8a1a989", help="git revision of the port before it was made faithful")
    ap.add_argument("--scenes", type=int, default=1024, help="synthetic scenes in the match count (--compare)")
    ap.add_argument("--seeds", type=int, default=3, help="noise seeds per photo setting (--compare)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cls = load_official(args.official)
    if args.fixture:
        write_fixture(cls, args.official)
        return
    if shutil.which("git") is None:
        raise SystemExit(f"published_fixture --compare reads the port before it was made faithful from git history "
                         f"(git show {args.old_rev}:python_ref/published.py) and git is not on PATH: "
                         "run it in a git checkout with git installed")
    load_start = list(os.getloadavg())
    commit = git_commit(_ROOT)
    dirty = bool(subprocess.check_output(["git", "-C", _ROOT, "status", "--porcelain", "--", "python_ref",
                                          "bench/published_fixture.py"], text=True))
    res = compare(cls, args.official, args.old_rev, args.scenes, range(args.seeds))
    res["keep_count_vs_batch"] = keep_count_vs_batch(cls, 64)
    res["candidates_vs_noise"] = candidates_vs_noise(cls, 64, 8)
    res["sinkhorn_sensitivity"] = sinkhorn_sensitivity(64)
    doc = {
        "device": cpu_info(),
        "torch": torch.__version__,
        "threads": args.threads,
        "commit": commit,
        "commit_dirty": dirty,
        "official_repo": "https://github.com/PGSmall/clip-pgs",
        "official_commit": git_commit(args.official),
        "old_port_rev": subprocess.check_output(["git", "-C", _ROOT, "rev-parse", args.old_rev], text=True).strip(),
        "command": "python -m bench.published_fixture " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "loadavg_start": load_start,
        "loadavg_end": list(os.getloadavg()),
        **res,
    }
    out = result_path(RESULTS_NAME)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    print(json.dumps({k: doc[k] for k in ("match", "totals", "attn_mask_equal", "sk_divisions_histogram",
                                          "kept_set_decided_by_sort_ties", "candidates_vs_noise",
                                          "sinkhorn_sensitivity")}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
