"""Random token batches for the tiny causal LMs of the tests (vocabulary 30,522, as conftest's models)."""

import torch


def random_token_batches(seed: int = 0, count: int = 3) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of 2 × 12 random token ids, reproducible by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 30522, (2, 12), generator=generator)} for _ in range(count)]
