"""A small CLIP to train with each masking mode: the model (``model``), its
data (``data``), the trainer (``python -m bench.clip.train``), the training
throughput benchmark (``python -m bench.clip.throughput``) and the training
quality study (``python -m bench.clip.quality``)."""
