"""Integrations with other training loops (each imports its framework only when imported itself).

* :mod:`constrainedsparse.integrations.hf`: ``SparsityTrainer``, a ``transformers.Trainer`` that
  prunes while it trains (needs the ``llm`` extra).
"""
