"""Performance benchmarks of fovlm: training, autoregressive encoding, generation, scoring and data loading.

``python -m fovlm.bench`` (``make bench``) measures on the CPU, ``python -m fovlm.bench.gpu``
(``make bench-gpu``) on a CUDA device. Model FLOPs are counted analytically (:mod:`fovlm.bench.flops`); the
naive variants that the design choices are measured against live in :mod:`fovlm.bench.naive`.
"""
