"""``python -m uap_lightning.bench``."""

from uap_lightning.bench.cli import main

main()
