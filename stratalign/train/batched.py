"""Many runs trained together: one loop, stacked heads, one batched matmul per layer (METHOD.md 3.6).

A group holds S runs that agree on everything the shared step needs (`group_key`: head kind and dims,
lr, betas, weight decay, max_steps, eval_every, tau, the effective batch b = min(batch_size, n_train),
device, whether heads are variational); `train_heads` is the S = 1 case of this very code. Each run keeps
what makes it itself:
- its seed: heads initialised under torch.manual_seed(seed) as alone; the global RNG state right after
  that init becomes the run's own generator (dropout masks, VIB noise), so it draws what it would alone;
  its own torch.Generator(seed) for the epoch permutations;
- its own training and validation rows (any subset size; epochs of different lengths), objective and
  knob values (lam, beta: a per-run weight), warm-up and checkpoint schedule;
- its own gradient-norm clip (1.0 per head, over that run's slice of the stacked parameters);
- its own selector (`loop.CheckpointSelector`, made by `loop.make_selector`), history and early stopping: a
  run whose patience expires (or whose loss turns non-finite) stops, keeps its chosen checkpoint and
  leaves the stack (its slices of the parameters and of the AdamW state are dropped), the others go on.
AdamW is elementwise, so one optimiser over the stacked tensors is S separate ones (same lr schedule);
the loss is the sum of the runs' losses, whose gradient w.r.t. each run's slice is that run's own.
The CLIP loss and the regularisers run run by run on the stacked embeddings (small (b, b) products; the
head matmuls, the backward pass and the optimiser are the batched part), so every run keeps its own bits:
a run equals the single-run trainer of 3270fe2 bitwise with linear and mlp heads, to ~1e-7 with
residual heads (see stacked.py); batched and alone agree to 1e-5 (tests/test_batched_train.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from stratalign.core import losses as L
from stratalign.core.heads import AlignedHeads, build_head
from stratalign.core.objectives import CLOSED_FORM_HEADS, KnnSupport, Objective, Side, StepBatch, objective_named
from stratalign.errors import StratalignError
from stratalign.train import loop
from stratalign.train.config import TrainConfig, TrainResult
from stratalign.train.stacked import StackedSide

# TrainConfig fields a run of a group may set for itself; every other field must agree within a group
PER_RUN_FIELDS = ("objective", "seed", "patience", "warmup_steps", "warmup_fraction", "lam", "beta", "batch_size")


def make_heads(cfg: TrainConfig, d_img: int, d_txt: int) -> AlignedHeads:
    """Fresh image and text heads for a config (variational when the objective samples embeddings)."""
    if cfg.head in CLOSED_FORM_HEADS:
        raise StratalignError(f"the {cfg.head} head is fitted in closed form: use train_csa / fit_csa")
    opts = dict(cfg.head_options)
    if objective_named(cfg.objective).variational:
        opts["variational"] = True
    return AlignedHeads(build_head(cfg.head, d_img, cfg.dim, **opts), build_head(cfg.head, d_txt, cfg.dim, **opts))


def group_key(cfg: TrainConfig, n_train: int, dims: tuple[int, int], device: str) -> tuple:
    """What runs must share to train in one group (see the module docstring)."""
    shared = tuple((k, repr(v)) for k, v in sorted(vars(cfg).items()) if k not in PER_RUN_FIELDS)
    return shared, min(cfg.batch_size, n_train), dims, device, objective_named(cfg.objective).variational


@dataclass
class GroupRun:
    """One run of a group: its config and device index tensors into the group's feature tables."""

    cfg: TrainConfig
    train_pos: torch.Tensor  # (n_train,) rows of the group tables
    val_pos: torch.Tensor  # (n_val,)
    graphs: tuple[torch.Tensor, torch.Tensor] | None = None  # kNN graphs over the training positions


class _Run:
    """Per-run state: objective, warm-up, batches, selector, history, where it sits in the stack."""

    def __init__(self, spec: GroupRun, model: AlignedHeads, rng: torch.Generator, b: int) -> None:
        self.spec, self.cfg, self.model, self.rng, self.b = spec, spec.cfg, model, rng, b
        self.obj: Objective = objective_named(spec.cfg.objective)
        self.warmup = spec.cfg.resolved_warmup()
        self.perm = torch.Generator().manual_seed(spec.cfg.seed)
        self.epoch: list[torch.Tensor] = []
        self.sel = loop.make_selector(self.obj, self.warmup, spec.cfg.patience)
        self.history: list[dict[str, Any]] = [{"step": 0}]
        self.buf: list[tuple[int, float, float, float, float, float]] = []
        self.stop: tuple[int, str, str] | None = None
        self.tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def lam_of(self, step: int) -> float:
        return L.lambda_at(step, self.cfg.lam, self.warmup) if self.obj.warmup else 0.0

    def next_batch(self) -> torch.Tensor:
        """The next batch of training positions (a new seeded epoch when the last one is used up)."""
        if not self.epoch:
            self.epoch = list(reversed(loop._batches(len(self.spec.train_pos), self.cfg.batch_size, self.perm)))
        return self.epoch.pop()

    def due(self, step: int) -> bool:
        return step % self.cfg.eval_every == 0 or step == self.cfg.max_steps or step == self.warmup

    def flush(self) -> int | None:
        """Buffered step losses into the history; the first non-finite step, if any."""
        bad = None
        for s, lr, lam, lo, cl, rg in self.buf:
            self.history.append({"step": s, "lr": lr, "lambda": lam, "loss": lo, "clip": cl, "reg": rg})
            if bad is None and not np.isfinite([lo, cl, rg]).all():
                bad = s
        self.buf.clear()
        return bad

    def finish(self, seconds: float, dev: torch.device, group_size: int) -> TrainResult:
        """Restore the chosen checkpoint and describe how it was chosen (as a run alone does)."""
        step, reason, message = self.stop or (0, "max_steps", "")
        best_val, best_step, state, before = self.sel.chosen()
        self.model.load_state_dict(state)
        self.model.eval()
        if before:
            message += (f"; no checkpoint after the {self.warmup}-step warm-up was usable, so the restored one is "
                        "from inside the warm-up (the regulariser was not at full strength)")
        lam_best = float(self.lam_of(best_step - 1)) if best_step > 0 else 0.0
        message += f"; restored step {best_step} (lambda {lam_best:g})"
        return TrainResult(model=self.model, config=self.cfg, best_step=best_step, lambda_at_best=lam_best,
                           best_val_clip=best_val, warmup_steps=self.warmup, steps_taken=step, stopped_reason=reason,
                           message=message, restored_before_warmup=before, history=self.history,
                           seconds=seconds, device=str(dev), group_size=group_size)


def _clip_per_run(params: list[torch.Tensor], max_norm: float = 1.0) -> None:
    """clip_grad_norm_(max_norm) of each run's slice of one head's stacked parameters, run by run with the
    kernels clip_grad_norm_ uses (a norm over an (S, n) tensor's rows may sum in another order)."""
    for s in range(params[0].shape[0]):
        grads = [p.grad[s] for p in params]
        total = torch.nn.utils.get_total_norm(grads, 2.0)  # what clip_grad_norm_ computes (foreach norms)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)


def _clip_losses(zi: torch.Tensor, zt: torch.Tensor, tau: float) -> torch.Tensor:
    """(S,) CLIP losses, run by run: the (b, b) similarity of each run is its own matmul, so every run gets
    the bits it gets alone (vmap's bmm + batched cross-entropy differ from them by ~1e-7)."""
    return torch.stack([L.clip_loss(a, t, tau) for a, t in zip(zi, zt)])


class GroupLoop:
    """The optimisation loop of one group of runs (see the module docstring)."""

    def __init__(self, xi: torch.Tensor, xt: torch.Tensor, specs: list[GroupRun], dev: torch.device,
                 on_step: Callable[[int, list[_Run]], None] | None = None) -> None:
        self.xi, self.xt, self.dev, self.on_step = xi, xt, dev, on_step
        self.cfg = specs[0].cfg
        b = min(self.cfg.batch_size, len(specs[0].train_pos))
        self.runs = [self._init_run(s, b) for s in specs]
        self.active = list(self.runs)  # stack order
        self.image = StackedSide([r.model.image for r in self.runs])
        self.text = StackedSide([r.model.text for r in self.runs])
        for r in self.runs:
            if r.spec.graphs is not None:
                r.tables = (xi[r.spec.train_pos], xt[r.spec.train_pos])
        self.opt = self._optimiser()
        self.pending: list[tuple[list[_Run], float, list[float], torch.Tensor]] = []

    def _init_run(self, spec: GroupRun, b: int) -> _Run:
        devices = [self.dev.index or 0] if self.dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(spec.cfg.seed)
            model = make_heads(spec.cfg, self.xi.shape[1], self.xt.shape[1]).to(self.dev)
            if self.dev.type == "cuda":  # init ran on the CPU: the CUDA stream is still at the seed
                rng = torch.Generator(device=self.dev).manual_seed(spec.cfg.seed)
            else:
                rng = torch.Generator()
                rng.set_state(torch.get_rng_state())
        return _Run(spec, model, rng, b)

    def _params(self) -> list[torch.Tensor]:
        return list(self.image.params.values()) + list(self.text.params.values())

    def _optimiser(self) -> torch.optim.Optimizer:
        c = self.cfg
        return torch.optim.AdamW(self._params(), lr=c.lr, betas=c.betas, weight_decay=c.weight_decay)

    def _compact(self) -> None:
        """Drop stopped runs from the stack and from the AdamW state."""
        keep = [i for i, r in enumerate(self.active) if r.stop is None]
        idx = torch.tensor(keep, device=self.dev)
        old_state = self.opt.state
        moved = {**self.image.keep(idx), **self.text.keep(idx)}
        self.opt = self._optimiser()
        for old, new in moved.items():
            if old in old_state:
                self.opt.state[new] = {k: (v[idx].clone() if v.ndim > 0 else v.clone())
                                       for k, v in old_state[old].items()}
        self.active = [self.active[i] for i in keep]

    # ------------------------------------------------------------------ one step

    def _embed_batch(self, pos: torch.Tensor) -> tuple[Side, Side]:
        a, t = self.xi[pos], self.xt[pos]
        gens = [r.rng for r in self.active]
        oi, ot = self.image.forward(a, gens), self.text.forward(t, gens)
        if not self.image.variational:
            return Side(a, oi), Side(t, ot)
        scale = self.cfg.vib_scale
        sides = []
        for x, (mu, lv) in ((a, oi), (t, ot)):
            mu, lv = mu.float(), lv.float()
            eps = torch.stack([torch.randn(mu.shape[1:], generator=g, device=mu.device, dtype=mu.dtype) for g in gens])
            sides.append(Side(x, torch.nn.functional.normalize(mu + scale * torch.exp(0.5 * lv) * eps, dim=-1), mu, lv))
        return sides[0], sides[1]

    def _regularisers(self, rows: torch.Tensor, img: Side, txt: Side) -> torch.Tensor:
        """(S,) regulariser values (0 for runs whose objective has none), run by run on the stacked
        embeddings: each run's value has the bits it has alone (vmap would batch its matmuls and change them
        by ~1e-7, so stores rebuilt by this code would no longer match older ones byte for byte)."""
        vals = [self._one_regulariser(i, rows[i], img, txt) if r.obj.regulariser is not None
                else torch.zeros((), device=self.dev) for i, r in enumerate(self.active)]
        return torch.stack([v.float() for v in vals])

    def _one_regulariser(self, i: int, rows: torch.Tensor, img: Side, txt: Side) -> torch.Tensor:
        """The regulariser of the run at stack position i (kNN form: with its graphs, tables and head)."""
        r = self.active[i]
        ki = kt = None
        if r.spec.graphs is not None and r.tables is not None:
            ki = KnnSupport(self.image.one(i, r.rng), r.tables[0], r.spec.graphs[0])
            kt = KnnSupport(self.text.one(i, r.rng), r.tables[1], r.spec.graphs[1])
        pick = lambda t: None if t is None else t[i]  # noqa: E731
        si = Side(img.x[i], img.z[i], pick(img.mu), pick(img.logvar), knn=ki)
        st = Side(txt.x[i], txt.z[i], pick(txt.mu), pick(txt.logvar), knn=kt)
        return r.obj.regulariser(StepBatch(rows, si, st), r.cfg)

    def update(self, step: int) -> None:
        """One optimiser step of every active run."""
        c = self.cfg
        rows = torch.stack([r.next_batch() for r in self.active]).to(self.dev)
        pos = torch.stack([r.spec.train_pos[rw] for r, rw in zip(self.active, rows)])
        lr = c.lr * loop._cosine(step, c.max_steps)  # LambdaLR's value at this update
        lams = [r.lam_of(step) for r in self.active]
        weights = torch.tensor([r.obj.weight(r.cfg, lam) if r.obj.regulariser is not None else 0.0
                                for r, lam in zip(self.active, lams)], device=self.dev)
        with loop.autocast(self.dev, c.amp):
            img, txt = self._embed_batch(pos)
            clip = _clip_losses(img.z, txt.z, c.tau)
            reg = self._regularisers(rows, img, txt)
            loss = clip + weights * reg
        self.opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        _clip_per_run(list(self.image.params.values()))
        _clip_per_run(list(self.text.params.values()))
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        self.pending.append((list(self.active), lr, lams,
                             torch.stack([loss.detach().float(), clip.detach().float(), reg.detach().float()], 1)))

    def _flush_pending(self) -> None:
        if not self.pending:
            return
        vals = torch.cat([p[3] for p in self.pending]).cpu().numpy().tolist()
        at = 0
        for step0, (runs, lr, lams, _) in enumerate(self.pending, start=self.step - len(self.pending) + 1):
            for r, lam in zip(runs, lams):
                lo, cl, rg = vals[at]
                r.buf.append((step0, lr, lam, lo, cl, rg))
                at += 1
        self.pending.clear()

    # ------------------------------------------------------------------ validation and checkpoints

    @torch.no_grad()
    def validate(self, runs: list[_Run]) -> list[float]:
        """Validation CLIP loss of each run: chunks of min(batch_size, n_val) rows, size-weighted mean."""
        out: dict[int, float] = {}
        buckets: dict[tuple[int, int], list[_Run]] = {}
        for r in runs:
            n_val = len(r.spec.val_pos)
            buckets.setdefault((n_val, min(r.cfg.batch_size, n_val)), []).append(r)
        where = {id(r): i for i, r in enumerate(self.active)}
        for (n_val, b), group in buckets.items():
            sel = torch.tensor([where[id(r)] for r in group], device=self.dev)
            vpos = torch.stack([r.spec.val_pos for r in group])
            total, count = np.zeros(len(group)), 0
            for s in range(0, n_val, b):
                chunk = vpos[:, s:s + b]
                if chunk.shape[1] < 2:
                    continue
                with loop.autocast(self.dev, self.cfg.amp):
                    zi, zt = self.image.embed(self.xi[chunk], sel), self.text.embed(self.xt[chunk], sel)
                    v = _clip_losses(zi, zt, self.cfg.tau)
                total += np.asarray(v.float().cpu().tolist()) * chunk.shape[1]
                count += chunk.shape[1]
            for r, tv in zip(group, total):
                out[id(r)] = float(tv) / count
        return [out[id(r)] for r in runs]

    def _state_of(self, r: _Run) -> Callable[[], dict[str, torch.Tensor]]:
        def state() -> dict[str, torch.Tensor]:
            i = self.active.index(r)
            return {**{f"image.{k}": v for k, v in self.image.state(i).items()},
                    **{f"text.{k}": v for k, v in self.text.state(i).items()}}
        return state

    def evaluate(self, runs: list[_Run], step: int) -> list[float]:
        vals = self.validate(runs)
        for r, v in zip(runs, vals):
            r.history[step]["val_clip"] = v
            r.sel.offer(step, v, self._state_of(r))
        return vals

    def checkpoint(self, runs: list[_Run], step: int) -> None:
        """Record losses, evaluate, offer checkpoints; mark the runs that stop here."""
        self._flush_pending()
        alive = []
        for r in runs:
            bad = r.flush()
            if bad is not None:
                del r.history[bad + 1:]
                r.stop = (bad, "non_finite", f"non-finite training loss at step {bad}")
            else:
                alive.append(r)
        for r, v in zip(alive, self.evaluate(alive, step) if alive else []):
            if not math.isfinite(v):
                r.stop = (step, "non_finite", f"non-finite validation loss at step {step}")
            elif r.sel.should_stop(step):
                r.stop = (step, "early_stopping", f"no validation improvement for {r.cfg.patience} steps")

    def run(self) -> list[TrainResult]:
        """Train until every run stopped or max_steps; each run restores its own checkpoint."""
        t0 = time.perf_counter()
        c, self.step = self.cfg, 0
        self.evaluate(self.active, 0)
        while self.active:
            self.update(self.step)
            self.step += 1
            due = [r for r in self.active if r.due(self.step)]
            if due:
                self.checkpoint(due, self.step)
            if self.step >= c.max_steps:
                self._flush_pending()
                for r in self.active:
                    r.flush()
                    if r.stop is None:
                        r.stop = (self.step, "max_steps", f"reached max_steps={c.max_steps}")
            if self.on_step:
                self.on_step(self.step, self.runs)
            if any(r.stop is not None for r in self.active):
                if all(r.stop is not None for r in self.active):
                    break
                self._compact()
        seconds = (time.perf_counter() - t0) / len(self.runs)
        return [r.finish(seconds, self.dev, len(self.runs)) for r in self.runs]
