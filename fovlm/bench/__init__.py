"""Performance benchmarks of fovlm: training, autoregressive encoding, generation, scoring and data loading.

``python -m fovlm.bench`` (``make bench``) measures on the CPU, ``python -m fovlm.bench.gpu``
(``make bench-gpu``) on a CUDA device. Model FLOPs are counted analytically (:mod:`fovlm.bench.flops`); the
naive variants that the design choices are measured against live in :mod:`fovlm.bench.naive`.

Both runs share :mod:`~fovlm.bench.runner` (the plan per size and the report), :mod:`~fovlm.bench.measure`
(timing, peak memory, matmul rates), :mod:`~fovlm.bench.inputs` (modules, synthetic batches, a JPEG shard),
the sections (:mod:`~fovlm.bench.training`, :mod:`~fovlm.bench.encoding`, :mod:`~fovlm.bench.answering`,
:mod:`~fovlm.bench.data_loading`) and the printed :mod:`~fovlm.bench.table`.
"""
