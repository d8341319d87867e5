"""The benchmark's parts: a naive reference, the ART peer, rows, the profile and the efficiency
measure. The benchmark itself is the task ``task=bench`` (``uap_lightning.tasks.bench``), run by
its entry ``python -m uap_lightning.bench`` (``uap_lightning.bench``).
"""
