"""Per-sample cache of the geometry term's reference similarities.

The reference of L_geo is the base model with the LoRA adapters disabled. Its weights
never change during a run, so a sample's reference text-to-image similarity rows are a
constant of the sample: they are computed once (one extra no-grad forward the first
time the sample is seen) and reused in later epochs, rounds and stages.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

import torch
from torch import Tensor


class ReferenceCache:
    """LRU map from a sample key to its valid reference rows (n_q, P), on CPU.

    Parameters
    ----------
    max_entries : int
        Bound on cached samples (least recently used are evicted); 0 disables caching.
    """

    def __init__(self, max_entries: int) -> None:
        if max_entries < 0:
            raise ValueError(f"`max_entries` must be >= 0, got {max_entries}.")
        self.max_entries = max_entries
        self._rows: OrderedDict[Hashable, Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    def lookup(
        self, keys: Sequence[Hashable], mask: Tensor, num_keys: int
    ) -> Tensor | None:
        """The batch's (B, T, P) reference, or None unless every key is cached.

        Parameters
        ----------
        keys : Sequence[Hashable]
            One key per batch row.
        mask : Tensor
            (B, T) bool, the text rows used by the loss.
        num_keys : int
            P, the number of image tokens.
        """
        if self.max_entries == 0 or any(k not in self._rows for k in keys):
            self.misses += len(keys)
            return None
        rows = []
        for b, key in enumerate(keys):
            cached = self._rows[key]
            if cached.shape != (int(mask[b].sum()), num_keys):
                self.misses += len(keys)
                return None
            self._rows.move_to_end(key)
            rows.append(cached)
        self.hits += len(keys)
        full = torch.zeros(*mask.shape, num_keys, dtype=rows[0].dtype)  # (B, T, P)
        full[mask.cpu()] = torch.cat(rows)  # row-major order matches mask[b, t]
        return full.to(mask.device)

    def store(self, keys: Sequence[Hashable], log_ref: Tensor, mask: Tensor) -> None:
        """Keep each row's valid reference rows ``log_ref[b][mask[b]]``."""
        if self.max_entries == 0:
            return
        log_ref, mask = log_ref.detach().float().cpu(), mask.cpu()
        for b, key in enumerate(keys):
            self._rows[key] = log_ref[b][mask[b]].clone()  # (n_q, P)
            self._rows.move_to_end(key)
        while len(self._rows) > self.max_entries:
            self._rows.popitem(last=False)
