"""The KV cache for generation: preallocated buffers, addressed by token position.

Each cached key knows its absolute position, so masks are built from positions, exactly as in a
full forward. That is what makes cached decoding equal to one full forward, with left padding
(each sample has its own positions) and across chunk boundaries.

Two kinds of slot tables:
- `full` (NoPE layers): one slot per position, the whole history is kept.
- `chunked` (RoPE layers with chunked attention): a ring of `chunk_size` slots (slot = position mod
  chunk). A query at position p only sees keys of its own chunk [p // C * C, p], so nothing older
  than one chunk is ever needed.
One extra slot at the end takes the writes of padding tokens and of tokens a ring cannot keep;
it is never read.
"""
from __future__ import annotations

import torch


class SlotTable:
    """Where each new token's K/V goes, and the position held by every slot. Shared by all layers of a kind."""

    def __init__(self, batch_size: int, num_slots: int, ring: int | None, device):
        self.num_slots = num_slots
        self.ring = ring  # chunk size for a ring, None for one slot per position
        # [B, num_slots + 1] position of the token in each slot, -1 = empty (the last slot is the trash slot)
        self.positions = torch.full((batch_size, num_slots + 1), -1, dtype=torch.long, device=device)

    @property
    def trash(self) -> int:
        return self.num_slots

    def assign(self, positions: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Slots for new tokens. positions, valid: [B, T]. Returns (slots [B, T], all_valid_kept)."""
        if self.ring is None:
            furthest = int(torch.where(valid, positions, -1).max())
            if furthest >= self.num_slots:
                raise ValueError(f"KV cache is full: position {furthest} does not fit in "
                                 f"{self.num_slots} slots; create the cache with a larger max_length")
            keep = valid
            slots = positions
        else:
            # Only the tokens of each sample's last chunk are kept: older ones can never be seen again.
            last = torch.where(valid, positions, -1).max(dim=1, keepdim=True).values  # [B, 1]
            keep = valid & (positions // self.ring == last // self.ring)
            slots = positions % self.num_slots
        slots = torch.where(keep, slots, torch.full_like(slots, self.trash))
        return slots, bool((keep == valid).all())

    def write(self, slots: torch.Tensor, positions: torch.Tensor):
        self.positions.scatter_(1, slots, positions)
        self.positions[:, self.trash] = -1


class LayerKV:
    """Preallocated K/V buffers of one attention layer. [B, kv_heads, slots + 1, head_dim]."""

    def __init__(self, table: SlotTable, batch_size: int, num_kv_heads: int, head_dim: int, dtype, device):
        self.table = table
        shape = (batch_size, num_kv_heads, table.num_slots + 1, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """k, v: [B, kv_heads, T, head_dim] written at slots [B, T]."""
        index = slots[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.k.scatter_(2, index, k.to(self.k.dtype))
        self.v.scatter_(2, index, v.to(self.v.dtype))

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.table.num_slots
        return self.k[:, :, :n], self.v[:, :, :n]


class DecoderCache:
    """All the KV state of one generation: a slot table per layer kind and K/V buffers per layer."""

    def __init__(self, config, batch_size: int, max_length: int, dtype=torch.float32, device=None):
        self.max_length = max_length
        # [B, 1] the position the next token of each sample gets by default
        self.next_positions = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.tables: dict[str, SlotTable] = {}
        self.layers: list[LayerKV] = []
        for i in range(config.num_layers):
            kind = "chunked" if config.is_chunked_layer(i) else "full"
            if kind not in self.tables:
                chunk = config.attention_chunk_size
                ring = chunk if kind == "chunked" and chunk < max_length else None
                self.tables[kind] = SlotTable(batch_size, ring or max_length, ring, device)
            self.layers.append(LayerKV(self.tables[kind], batch_size, config.num_kv_heads, config.head_dim,
                                       dtype, device))

    def is_empty(self) -> bool:
        return all(bool((t.positions < 0).all()) for t in self.tables.values())
