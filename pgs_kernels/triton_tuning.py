"""Launch settings of the fused Triton kernel, per GPU architecture and shape.

``lookup(arch, grid, token_width)`` gives the settings the launcher
(``triton_pgs._launch_plan``) merges into every launch of one call:

* ``num_warps``, ``num_stages``: Triton's launch options;
* ``maxnreg``: the register cap a thread (an int, or ``None``: ptxas's own);
* ``DOT``: the ``input_precision`` of the pixel product's ``tl.dot``
  (``"ieee"``: fp32 FMA; ``"tf32x3"``: three TF32 tensor-core products,
  about fp32's accuracy).

``arch`` is ``"sm_XY"`` (``triton_pgs._arch``), ``grid`` the patch grid
``(GH, GW) = (H // P, W // P)``, ``token_width`` the token width ``D`` when
the token term is on (``token_weight > 0``), else 0.

The table. ``triton_tuning.json`` beside this module (shipped in the wheel
and the sdist) holds what a GPU measured: ``python -m bench.kernel_sweep``
(in ``bench/gpu_suite.sh``, part ``sweep``) times every setting of
:data:`SPACE` on that GPU, lets only those whose outputs match the fp64
reference win, and writes the winners in this format; ``python -m
bench.kernel_sweep --merge FILE`` folds them into the table::

    {"format": 1,
     "entries": [
      {"arch": "sm_90", "grid": [14, 14], "token_width": 768,
       "settings": {"num_warps": 8, "num_stages": 2, "maxnreg": 128, "DOT": "ieee"},
       "provenance": {"device_name": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0",
                      "commit": "<git HEAD>", "date": "...", "batch": 256,
                      "median_us": 101.3, "default_us": 104.9,
                      "default": {...DEFAULT when measured}}}]}

One entry per key ``(arch, grid, token_width)``; ``settings`` are laid over
:data:`DEFAULT` (a setting added since the table was written takes its
default; one the kernel no longer has is ignored); ``provenance`` is for
people (the device, the versions, the commit, the winner's and the
default's median time in µs at that batch) and is not read here. Where the
table has no entry for a key, :data:`DEFAULT`, the offline best, applies.

The table path is ``PGS_TRITON_TUNING`` when set (tests point it at a
temporary file), else ``triton_tuning.json`` here. It is parsed once per
path and cached (:func:`clear_cache` forgets it); a table that does not
parse warns once and gives :data:`DEFAULT` everywhere: a bad table never
stops a launch.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import warnings
from typing import Dict, Iterator, Mapping, Optional, Sequence, Tuple

__all__ = ["DEFAULT", "ARCH_DEFAULTS", "default_for", "SPACE", "TABLE_PATH", "FORMAT", "candidates", "lookup", "load_table", "table_path",
           "entry_key", "clear_cache"]

#: The offline best (``bench/kernel_report.py``: registers, spills and issue
#: slots on sm_90 and sm_80), used wherever the table has no entry.
DEFAULT: Dict[str, object] = dict(num_warps=8, num_stages=2, maxnreg=128, DOT="tf32x3")

#: Where an architecture's offline best differs from :data:`DEFAULT`
#: (:func:`default_for`): sm_80 has no warpgroup MMA, and its tf32 product
#: on the warp-level MMA spills at the large grids.
ARCH_DEFAULTS: Dict[str, Dict[str, object]] = {"sm_80": dict(DOT="ieee")}

#: The search space of ``bench.kernel_sweep``: every combination is a
#: candidate. Within each tuple the values are in the order of promise (the
#: sweep tries combinations closest to :data:`DEFAULT` first, earlier values
#: first); add a value or a setting here and the next sweep tries it.
SPACE: Dict[str, Tuple] = {
    "num_warps": (8, 4, 16),
    "num_stages": (2, 1, 3),
    "maxnreg": (128, None),
    "DOT": ("tf32x3", "ieee"),
}

#: The committed table.
TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_tuning.json")
#: The table's format version (``"format"`` in the JSON).
FORMAT = 1
#: Environment variable naming another table file.
ENV = "PGS_TRITON_TUNING"

Key = Tuple[str, Tuple[int, int], int]


def entry_key(arch: str, grid: Sequence[int], token_width: int) -> Key:
    """The table's key: ``("sm_90", (14, 14), 768)``."""
    gh, gw = grid
    return str(arch), (int(gh), int(gw)), int(token_width)


def candidates(space: Optional[Mapping[str, Sequence]] = None,
               default: Optional[Mapping[str, object]] = None) -> Iterator[Dict[str, object]]:
    """Every setting of ``space`` (default :data:`SPACE`) as a full dict over
    ``default`` (default :data:`DEFAULT`), most promising first: ``default``
    itself, then by the number of settings that differ from it, then by the
    values' places in ``space``. ``default`` comes first even where ``space``
    does not hold it."""
    space = SPACE if space is None else space
    default = DEFAULT if default is None else default
    names = list(space)
    combos = []
    for idx in itertools.product(*(range(len(space[n])) for n in names)):
        s = dict(default)
        s.update({n: space[n][i] for n, i in zip(names, idx)})
        dist = sum(s[n] != default.get(n) for n in names)
        combos.append((dist, sum(idx), idx, s))
    combos.sort(key=lambda c: c[:3])
    yield dict(default)
    for _, _, _, s in combos:
        if s != dict(default):
            yield s


def table_path() -> str:
    """``PGS_TRITON_TUNING`` when set, else the committed table."""
    return os.environ.get(ENV) or TABLE_PATH


def load_table(path: Optional[str] = None) -> Dict[Key, Dict[str, object]]:
    """The table at ``path`` (default :func:`table_path`) as ``{key: settings}``
    (settings as stored, not yet over :data:`DEFAULT`); raises ``ValueError``
    on a file that is not a table. A missing file is an empty table."""
    path = path or table_path()
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("entries"), list):
        raise ValueError(f"{path}: not a tuning table of format {FORMAT} (a 'format' and an 'entries' list)")
    table = {}
    for n, e in enumerate(doc["entries"]):
        try:
            key = entry_key(e["arch"], e["grid"], e["token_width"])
            settings = dict(e["settings"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: entry {n} lacks arch, grid [GH, GW], token_width or settings ({exc!r})")
        if key in table:
            raise ValueError(f"{path}: two entries for {key}")
        table[key] = settings
    return table


_lock = threading.Lock()
_tables: Dict[str, Dict[Key, Dict[str, object]]] = {}


def _table(path: str) -> Dict[Key, Dict[str, object]]:
    table = _tables.get(path)
    if table is None:
        with _lock:
            table = _tables.get(path)
            if table is None:
                try:
                    raw = load_table(path)
                except (OSError, ValueError) as exc:
                    warnings.warn(f"pgs_kernels: the Triton tuning table does not parse ({exc}); "
                                  "every launch uses triton_tuning.DEFAULT", RuntimeWarning, stacklevel=3)
                    raw = {}
                # Over the architecture's default, and only the settings the kernel takes.
                table = {k: {n: s.get(n, v) for n, v in default_for(k[0]).items()} for k, s in raw.items()}
                _tables[path] = table
    return table


def default_for(arch: str) -> Dict[str, object]:
    """The offline best for ``arch``: :data:`DEFAULT` with the architecture's
    own values from :data:`ARCH_DEFAULTS` (a fresh dict)."""
    return {**DEFAULT, **ARCH_DEFAULTS.get(str(arch), {})}


def lookup(arch: str, grid: Sequence[int], token_width: int) -> Dict[str, object]:
    """The launch settings for ``arch`` (``"sm_90"``), patch grid ``(GH, GW)``
    and token width (0 without the token term): the table's entry over
    :data:`DEFAULT`, or :func:`default_for` ``arch``. A fresh dict each call
    (the caller may change it); the table is parsed once."""
    s = _table(table_path()).get(entry_key(arch, grid, token_width))
    return default_for(arch) if s is None else dict(s)


def clear_cache() -> None:
    """Forget the parsed tables (after the file or ``PGS_TRITON_TUNING`` changed)."""
    with _lock:
        _tables.clear()
