"""The benchmark's parts: a naive reference, the ART peer, rows, the profile and the efficiency
measure. The benchmark itself is the task ``task=bench`` (``uap_lightning.tasks.bench``), run by
``python -m uap_lightning.bench`` and the ``uap-bench`` console script (``run.bench_main``).
"""
