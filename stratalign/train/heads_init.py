"""A run's heads, built under its seed exactly as when it trains alone, and its generator for dropout and VIB noise."""

from __future__ import annotations

import torch

from stratalign.core.heads import AlignedHeads, build_head
from stratalign.core.objectives import CLOSED_FORM_HEADS, objective_named
from stratalign.errors import StratalignError
from stratalign.train.config import TrainConfig


def make_heads(cfg: TrainConfig, d_img: int, d_txt: int) -> AlignedHeads:
    """Fresh image and text heads for a config (variational when the run samples embeddings: VIB with beta > 0)."""
    if cfg.head in CLOSED_FORM_HEADS:
        raise StratalignError(f"the {cfg.head} head is fitted in closed form: use train_csa / fit_csa")
    opts = dict(cfg.head_options)
    if objective_named(cfg.objective).samples_embeddings(cfg):
        opts["variational"] = True
    return AlignedHeads(build_head(cfg.head, d_img, cfg.dim, **opts), build_head(cfg.head, d_txt, cfg.dim, **opts))


def init_run_heads(cfg: TrainConfig, d_img: int, d_txt: int, dev: torch.device) -> tuple[AlignedHeads, torch.Generator]:
    """The run's heads initialised under its seed (as alone), and its generator for dropout and VIB noise."""
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed)
        model = make_heads(cfg, d_img, d_txt).to(dev)
        if dev.type == "cuda":
            rng = torch.Generator(device=dev).manual_seed(cfg.seed)
        else:
            rng = torch.Generator()
            rng.set_state(torch.get_rng_state())
    return model, rng
