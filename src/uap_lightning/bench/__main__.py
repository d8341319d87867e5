"""``python -m uap_lightning.bench``."""

import sys

from uap_lightning.bench import main

sys.exit(main())
