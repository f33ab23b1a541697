"""``python -m constrainedsparse``."""

from constrainedsparse.cli import main
from constrainedsparse.distributed import exit_process


def _exit_code(stop: SystemExit) -> int:
    """A ``SystemExit``'s code as an int (a message is printed, as the interpreter would: code 1)."""
    if stop.code is None or isinstance(stop.code, int):
        return stop.code or 0
    print(stop.code, file=__import__("sys").stderr)
    return 1


try:
    code = main()
except SystemExit as stop:  # an error path's exit: a rank of a multi-process job still leaves by exit_process
    code = _exit_code(stop)
exit_process(code)
