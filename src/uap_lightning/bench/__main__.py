"""``python -m uap_lightning.bench``."""

import sys

from uap_lightning.run import bench_main

sys.exit(bench_main())
