"""``python -m constrainedsparse``."""

from constrainedsparse.cli import main
from constrainedsparse.distributed import exit_process

exit_process(main())
