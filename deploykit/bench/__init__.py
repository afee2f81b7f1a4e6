"""Measured, not claimed: ``deploykit bench`` and ``deploykit compare``.

- ``limits``: which project settings would shape a benchmark's load, and the bench project's config;
- ``results``: what a run measured, its summary figures and the JSON of ``results.json`` (pure);
- ``report`` and ``plot``: ``results.md`` (pure) and ``results.png`` (matplotlib);
- ``helper``: what runs inside the helper container on the stack's engine network, or the helper
  process beside a ``deploykit serve`` instance (the direct path and compare's engine calls;
  imports only the load generator);
- ``engine``: reaching a stack's engine (and its log) whatever runs it; ``enginenet``: starting
  the helper container, from the stack's own bridge image;
- ``enginelog`` and ``gpumemory``: weight and KV cache memory from the engine's log, peak GPU
  memory from NVML (pure parsers, thin readers);
- ``runner``: one stack's benchmark (MQTT, then the same load direct, per concurrency);
- ``methods``: which methods the pinned GPUs run, and one stack per method after another;
- ``compare``: a candidate's outputs and next-token distributions against a baseline's.

Nothing here is imported by the bridge, and the helper needs only what the bridge image has.
"""
