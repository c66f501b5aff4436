"""Image-caption data for the thin CLIP trainer.

* :class:`SyntheticScenes` (the default): ``bench.clip.scenes.CaptionedScenes``
  (1-3 coloured shapes on a dark, slightly noisy background, each in its own
  cell of a 3x3 layout, captioned e.g. "a red circle on the left and a blue
  square at the bottom"), CLIP-normalized and tokenized. Sample ``i`` depends
  only on ``(seed, i)``, so every run, batch size and rank count sees the
  same data. Colour, shape and place are all needed to tell
  captions apart, so a tiny model's contrastive loss falls within a few
  hundred CPU steps.
* :class:`CsvCaptions`: real pairs in open_clip's CSV convention (a
  ``filepath`` and a ``title`` column, tab-separated by default), loaded with
  PIL, resized on the short side and centre-cropped.

Tokenizers are deliberately simple, not CLIP's BPE: :class:`SceneTokenizer`
has one id per word of the scene grammar; :class:`HashTokenizer` (used for
CSV captions) lowercases, splits into words and punctuation and hashes each
word (CRC32) into the vocabulary, so unrelated words may share an id. Both
reserve ``0`` for padding, ``vocab - 2`` for start-of-text and ``vocab - 1``
for end-of-text (the largest id, which the text tower pools at).
"""

from __future__ import annotations

import csv
import os
import re
import zlib
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from bench.clip.scenes import COLORS, PLACES, SHAPES, CaptionedScenes
from pgs_kernels.samples import clip_normalize

class SceneTokenizer:
    """One id per word of the scene captions (plus ``,``); ids 1..n."""

    def __init__(self, context_length: int, vocab_size: int):
        words = ["a", "an", "and", ","] + list(COLORS) + list(SHAPES)
        for p in PLACES:
            words += [w for w in p.split() if w not in words]
        self.words = list(dict.fromkeys(words))
        if vocab_size < len(self.words) + 3:
            raise ValueError(f"vocab_size={vocab_size} is too small for the {len(self.words)} scene words")
        self.ids = {w: i + 1 for i, w in enumerate(self.words)}
        self.context_length, self.sot, self.eot = context_length, vocab_size - 2, vocab_size - 1

    def split(self, text: str) -> List[str]:
        return text.replace(",", " ,").split()

    def encode(self, text: str) -> List[int]:
        return [self.ids[w] for w in self.split(text)]

    def __call__(self, texts: Sequence[str]) -> Tensor:
        return pack([self.encode(t) for t in texts], self.context_length, self.sot, self.eot)


class HashTokenizer:
    """Word-level, hashed: ``crc32(word) % (vocab - 3) + 1``. Stable across runs
    and processes (unlike Python's ``hash``); collisions are accepted."""

    _WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")

    def __init__(self, context_length: int, vocab_size: int):
        if vocab_size < 4:
            raise ValueError(f"vocab_size must be at least 4, got {vocab_size}")
        self.context_length, self.vocab = context_length, vocab_size
        self.sot, self.eot = vocab_size - 2, vocab_size - 1

    def encode(self, text: str) -> List[int]:
        words = self._WORD.findall(str(text).lower())
        return [zlib.crc32(w.encode()) % (self.vocab - 3) + 1 for w in words]

    def __call__(self, texts: Sequence[str]) -> Tensor:
        return pack([self.encode(t) for t in texts], self.context_length, self.sot, self.eot)


def pack(ids: List[List[int]], context_length: int, sot: int, eot: int) -> Tensor:
    """``[sot] + ids + [eot]`` zero-padded; too long is cut, keeping EOT last."""
    out = torch.zeros(len(ids), context_length, dtype=torch.long)
    for r, seq in enumerate(ids):
        seq = [sot] + list(seq)[: context_length - 2] + [eot]
        out[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


class SyntheticScenes:
    """:class:`bench.clip.scenes.CaptionedScenes` as training data:
    CLIP-normalized pixels and scene-word token ids; indexable without bound
    (``len`` is nominal)."""

    def __init__(self, image_size: int = 64, context_length: int = 32, vocab_size: int = 256,
                 seed: int = 0, size: int = 1 << 30, max_shapes: int = 3):
        self.scenes = CaptionedScenes(image_size, seed=seed, max_shapes=max_shapes)
        self.image_size, self.seed, self.size, self.max_shapes = image_size, seed, size, max_shapes
        self.tokenizer = SceneTokenizer(context_length, vocab_size)

    def __len__(self) -> int:
        return self.size

    def describe(self, index: int):
        """The scene of sample ``index``: a list of (color, shape, cell, jitter, scale), and its caption."""
        return self.scenes.describe(index)

    def render(self, indices: Sequence[int], device: torch.device | str = "cpu") -> Tuple[Tensor, List[str]]:
        """Pixels in [0, 1], (B, 3, S, S) on ``device``, and captions."""
        return self.scenes.render(indices, device)

    def batch(self, indices: Sequence[int], device: torch.device | str = "cpu") -> Tuple[Tensor, Tensor]:
        """Normalized images and token ids for ``indices``."""
        img, captions = self.render(indices, device)
        return clip_normalize(img), self.tokenizer(captions).to(device)

    def __getitem__(self, index: int) -> Tuple[Tensor, Tensor]:
        img, tok = self.batch([index])
        return img[0], tok[0]


class CsvCaptions(torch.utils.data.Dataset):
    """open_clip's CSV convention: one row per pair, image path in ``img_key``
    (default ``filepath``), caption in ``caption_key`` (default ``title``),
    ``sep`` tab by default. Relative paths are tried as given, then against
    the CSV's folder. A missing or unreadable image raises an error naming
    the CSV row and the file. Captions use :class:`HashTokenizer`."""

    def __init__(self, path: str, image_size: int = 224, context_length: int = 77, vocab_size: int = 49408,
                 sep: str = "\t", img_key: str = "filepath", caption_key: str = "title"):
        self.path, self.image_size = path, image_size
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CSV file {path!r} not found")
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=sep)
            fields = reader.fieldnames or []
            for key in (img_key, caption_key):
                if key not in fields:
                    raise ValueError(f"{path}: no column {key!r} (columns: {fields}; separator {sep!r})")
            rows = list(reader)
        self.files = [r[img_key] for r in rows]
        self.captions = [r[caption_key] for r in rows]
        self.base = os.path.dirname(os.path.abspath(path))
        self.tokenizer = HashTokenizer(context_length, vocab_size)

    def __len__(self) -> int:
        return len(self.files)

    def _resolve(self, index: int) -> str:
        p = self.files[index]
        if os.path.isabs(p) or os.path.exists(p):
            return p
        return os.path.join(self.base, p)

    def load_image(self, index: int) -> Tensor:
        from PIL import Image

        file = self._resolve(index)
        row = index + 2  # 1-based, after the header line
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{self.path}, row {row}: image file {self.files[index]!r} not found ({file})")
        try:
            with Image.open(file) as im:
                im = im.convert("RGB")
                w, h = im.size
                s = self.image_size / min(w, h)
                im = im.resize((max(self.image_size, round(w * s)), max(self.image_size, round(h * s))),
                               Image.BICUBIC)
                w, h = im.size
                left, top = (w - self.image_size) // 2, (h - self.image_size) // 2
                im = im.crop((left, top, left + self.image_size, top + self.image_size))
                arr = np.asarray(im, dtype=np.float32) / 255.0
        except Exception as exc:  # PIL raises several types for a bad file
            raise OSError(f"{self.path}, row {row}: cannot read image {file!r}: {exc}") from exc
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    def __getitem__(self, index: int) -> Tuple[Tensor, Tensor]:
        img = clip_normalize(self.load_image(index)[None])[0]
        return img, self.tokenizer([self.captions[index]])[0]


def batches(dataset, batch_size: int, *, rank: int = 0, world: int = 1, seed: int = 0, start_step: int = 0,
            device: torch.device | str = "cpu", num_workers: int = 0) -> Iterator[Tuple[Tensor, Tensor]]:
    """Endless per-rank batches. Synthetic: step ``t`` on rank ``r`` holds samples
    ``(t * world + r) * batch_size + [0, batch_size)``. CSV: each pass is a
    seeded shuffle split across ranks (the remainder dropped)."""
    if isinstance(dataset, SyntheticScenes):
        step = start_step
        while True:
            first = (step * world + rank) * batch_size
            yield dataset.batch(range(first, first + batch_size), device)
            step += 1
    n = len(dataset)
    per_rank = n // world
    if per_rank < batch_size:
        raise ValueError(f"{getattr(dataset, 'path', 'dataset')}: {n} rows give {per_rank} per rank, "
                         f"fewer than batch_size={batch_size}")
    epoch = 0
    while True:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        mine = order[rank * per_rank:(rank + 1) * per_rank].tolist()
        sub = torch.utils.data.Subset(dataset, mine)
        loader = torch.utils.data.DataLoader(sub, batch_size=batch_size, drop_last=True,
                                             num_workers=num_workers, pin_memory=str(device).startswith("cuda"))
        for img, tok in loader:
            yield img.to(device, non_blocking=True), tok.to(device, non_blocking=True)
        epoch += 1


def steps_per_epoch(dataset, batch_size: int, world: int = 1) -> Optional[int]:
    """Whole batches per pass for a CSV; None for the unbounded synthetic set."""
    if isinstance(dataset, SyntheticScenes):
        return None
    return max(1, len(dataset) // world // batch_size)


def make_dataset(spec: str, cfg, seed: int = 0, sep: str = "\t", img_key: str = "filepath",
                 caption_key: str = "title"):
    """``"synthetic"`` or a CSV path, sized for a :class:`bench.clip.model.CLIPConfig`."""
    if spec == "synthetic":
        return SyntheticScenes(cfg.image_size, cfg.context_length, cfg.vocab_size, seed=seed)
    return CsvCaptions(spec, cfg.image_size, cfg.context_length, cfg.vocab_size, sep, img_key, caption_key)
