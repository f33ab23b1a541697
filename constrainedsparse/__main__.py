"""``python -m constrainedsparse``."""

import sys

from constrainedsparse.cli import main

sys.exit(main())
