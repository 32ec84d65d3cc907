"""Unpaired rows in the R_S batches of the aligned-heads loop (docs/method.md § 3.11).

A run with `unpaired` = u > 0 holds, per modality, a pool of rows that have no partner (positions in the group's
unpaired tables). At every step it draws u rows of each pool, from seeded epochs of its own (one generator per
modality, so the images and the captions are drawn apart: no pairing reaches R_S through them). The heads embed the
batch's b paired rows as a run without unpaired rows does (the CLIP loss is taken on them alone), then the u unpaired
rows in a forward of their own; R_S of each modality reads the b + u rows of that modality. A pool smaller than u
gives all its rows (u = the pool's size; an empty pool none: R_S of that modality reads the pairs alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stratalign.core.objectives import Side
from stratalign.errors import StratalignError
from stratalign.train.data import to_device
from stratalign.train.stacked import StackedSide

# the generators of the image draws, the caption draws and the unpaired rows' dropout: seed + offset, apart from the
# run's own (its batches and dropout stay those of the run without unpaired rows)
SEED_OFFSET = (1_000_003, 2_000_003)
DROPOUT_OFFSET = 3_000_017


@dataclass
class UnpairedTables:
    """The unpaired rows of a group's runs, on the device: image features (N_i, d_v) and caption features (N_t, d_t)."""

    image: torch.Tensor
    text: torch.Tensor


class UnpairedDraws:
    """One run's draws: u rows of each modality's pool per step (positions into the group's UnpairedTables)."""

    def __init__(self, image_pos: torch.Tensor, text_pos: torch.Tensor, rows: int, seed: int,
                 dev: torch.device | None = None) -> None:
        self.pools = (image_pos, text_pos)
        self.rows = unpaired_counts(rows, self.pools)
        self.gens = [torch.Generator().manual_seed(seed + off) for off in SEED_OFFSET]
        self.left: list[list[torch.Tensor]] = [[], []]  # what is left of each pool's current epoch
        dev = image_pos.device if dev is None else dev  # the unpaired rows' dropout masks, drawn where they live
        self.dropout = torch.Generator(device=dev).manual_seed(seed + DROPOUT_OFFSET)

    def _take(self, m: int) -> torch.Tensor:
        pool, out, need = self.pools[m], [], self.rows[m]
        while need:
            if not self.left[m]:
                self.left[m] = [pool[torch.randperm(len(pool), generator=self.gens[m]).to(pool.device)]]
            head = self.left[m].pop()
            out.append(head[:need])
            if len(head) > need:
                self.left[m].append(head[need:])
            need -= len(out[-1])
        return torch.cat(out) if out else pool[:0]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(image positions, caption positions) of this step's unpaired rows, u each (none of an empty pool's)."""
        return self._take(0), self._take(1)


def unpaired_counts(rows: int, pools: tuple[Any, Any] | None) -> tuple[int, int]:
    """(image rows, caption rows) a step adds: `rows` of each modality, or its whole pool when that is smaller."""
    return (0, 0) if pools is None or not rows else (min(rows, len(pools[0])), min(rows, len(pools[1])))


def extend_sides(image: Side, text: Side, stacks: tuple[StackedSide, StackedSide], tables: UnpairedTables,
                 draws: list[UnpairedDraws]) -> tuple[Side, Side]:
    """Both stacked sides (S, b, .) with each run's u unpaired rows appended after its b paired rows: (S, b + u, .),
    what R_S reads. The unpaired rows go through the heads in a forward of their own (dropout from the draws' own
    generator), so the paired rows' embeddings, and the CLIP loss taken on them, are those of a run without them."""
    picks = [d.next() for d in draws]
    gens = [d.dropout for d in draws]
    out = []
    for m, (side, stack, table) in enumerate(zip((image, text), stacks, (tables.image, tables.text))):
        if not draws[0].rows[m]:  # no unpaired rows of this modality (the group's runs agree: group_key)
            out.append(side)
            continue
        x = torch.stack([table[p[m]] for p in picks]).to(side.x.dtype)
        z = stack.forward(x, gens)
        out.append(Side(torch.cat([side.x, x], 1), torch.cat([side.z, z.to(side.z.dtype)], 1)))
    return out[0], out[1]


def check_unpaired(rows: int, pools: tuple[np.ndarray, np.ndarray] | None,
                   tables: tuple[np.ndarray, np.ndarray] | None) -> None:
    """A run that asks for unpaired rows names pools within the tables, at least one of them not empty (one line)."""
    if not rows:
        return
    if pools is None or tables is None:
        raise StratalignError(f"unpaired={rows}: the run names no unpaired rows (give train_many `unpaired` tables "
                              "and the run's rows of them)")
    if not any(len(p) for p in pools):
        raise StratalignError(f"unpaired={rows}: the run has no unpaired image or caption rows to draw from")
    for name, pool, table in zip(("image", "caption"), pools, tables):
        pool = np.asarray(pool)
        if len(pool) and (pool.min() < 0 or pool.max() >= len(table)):
            raise StratalignError(f"unpaired {name} rows out of range: the table holds {len(table)} rows")


def unpaired_tables(tables: tuple[np.ndarray, np.ndarray] | None, specs: list[Any],
                    dev: torch.device) -> UnpairedTables | None:
    """The unpaired features on the device, when a run reads them (float32, finite: checked like the pairs)."""
    if tables is None or not any(s.cfg.unpaired for s in specs):
        return None
    image, text = (to_device(x, np.arange(len(x)), dev, name) for x, name in zip(tables, ("unpaired images",
                                                                                       "unpaired captions")))
    return UnpairedTables(image, text)
