"""The benchmark's entry, ``python -m uap_lightning.bench``: the run's entry point with the ``bench``
primary config (``task=bench``), like the ``uap-bench`` console script (``run.bench_main``). The
benchmark's task is ``uap_lightning.tasks.bench``, its parts are in ``uap_lightning.bench_parts``.
"""
