"""Optional dependencies: a feature whose package is missing says which extra installs it, in one line.

The core install trains and prunes plain PyTorch models; the bundled LLM problems, the compressed export and
:class:`~constrainedsparse.integrations.hf.SparsityTrainer` need the ``llm`` extra, the bundled ResNet the
``vision`` extra (``pyproject.toml``).
"""

from __future__ import annotations

import importlib.util

__all__ = ["require"]


def require(module: str, feature: str, extra: str) -> None:
    """Raises unless ``module`` can be imported.

    Args:
        module: The top-level module the feature imports (``"transformers"``).
        feature: What needs it, for the message (``"problem 'minilm-layerwise'"``).
        extra: The extra of ``constrainedsparse`` that installs it (``"llm"``).

    Raises:
        ValueError: Naming the feature, the missing package and the ``pip install`` line.
    """
    if importlib.util.find_spec(module) is None:
        raise ValueError(f'{feature} needs {module}, which is not installed: pip install "constrainedsparse[{extra}]"')
