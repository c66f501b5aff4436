"""Benchmarks and studies of pgs-kernels, run from the repository root as
modules (``python -m bench.<name>``); each writes its JSON into
``bench/out/`` (untracked) unless told ``--out``, or into ``bench/results/``
(the committed figures) with ``--refresh``; ``python -m bench.plot`` draws
the figures from the committed files (the retention figures: ``python -m
bench.retention --plot-only``).

* ``micro``         cost per call of the fused op against its baselines;
* ``native_speed``  the native CPU kernel against the reference;
* ``retention``     what each masking method keeps (scenes and photos);
* ``clip``          the CLIP trainer, its throughput and its quality study;
* ``common``        environment, load record, device choice, timers, writing;
* ``plot``          draws the figures from what the scripts hand it.
"""
