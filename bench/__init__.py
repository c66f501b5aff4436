"""Benchmarks, quality measurements and the thin CLIP trainer of pgs-kernels."""
