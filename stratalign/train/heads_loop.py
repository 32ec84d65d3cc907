"""Many runs of aligned heads trained together: one loop, stacked heads, batched matmuls (docs/method.md § 3.8).

`train_heads_many` takes jobs over one pair of feature tables and splits them into groups of runs that agree on
what one shared step needs (`group_key`: head kind and dims, lr, betas, weight decay, max_steps, eval_every,
tau, device, amp, the effective batch b = min(batch_size, n_train), variational or not). A run alone is the
S = 1 case of this very code (`train.fit.train_heads`). Each run keeps what makes it itself:
- its seed: its heads are initialised under torch.manual_seed(seed) as alone, its own generator cuts its epochs
  (torch.Generator(seed)), and one more (the RNG state right after init) draws its dropout masks and VIB noise;
- its own training rows (any subset of the tables; subsets of one size batch together), validation rows and
  targets, objective and knob values (lambda, beta, structure options: the loss of each objective is computed
  once over the slices of its runs, vectorised over runs when the objective's regulariser takes stacked
  batches, run by run otherwise), warm-up, patience and selection metric;
- its own gradient-norm clip (1.0 per head over that run's slice of the stacked parameters);
- its own selector, history and stop: a run whose patience runs out (or whose loss turns non-finite) keeps its
  chosen checkpoint and leaves the stack (its slices of the weights and of the AdamW state are dropped).
AdamW is elementwise, so one optimiser over the runs' tensors is S separate ones (one lr schedule; train.optim: torch's
fused kernel, every run's clip in three calls); the loss is the sum of the runs' losses, whose gradient with respect
to a run's slice is that run's own. Validation scores every run due at a step in one pass (`Validator.score_many`).
bf16 runs take the lean step, equal up to float rounding: the heads' bf16 products with each weight in its own layout
and the rows normalised in float32 (train.stacked), CLIP and R_S with hand-written backwards (core.losses_lean), R_S's
frozen side from a Gram matrix (train.frozen_side), each run's clip on the stacked gradients (train.optim).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

from stratalign.core import losses as losses_mod
from stratalign.core.heads import AlignedHeads, VariationalHead
from stratalign.core.losses_lean import clip_loss_stacked
from stratalign.core.mixup import LatentMixup, mix_runs
from stratalign.core.objectives import KnnSupport, Side, StepBatch, objective_named
from stratalign.train.cohorts import CohortCheckpoint, CohortTracker
from stratalign.train.config import TrainResult
from stratalign.train.frozen_side import FrozenSides
from stratalign.train.heads_groups import GroupProgress, HeadsJob, group_key, loss_key
from stratalign.train.heads_init import init_run_heads
from stratalign.train.optim import RunsAdamW, clip_grads_per_run, clip_stacked_per_run
from stratalign.train.rules import (
    CheckpointSelector,
    Pending,
    autocast,
    cosine_factor,
    epoch_batches,
    evaluation_due,
    history_rows,
    restore_chosen,
    stop_reason,
    validation_history,
)
from stratalign.train.stacked import StackedSide, canonical_grad, slice_side
from stratalign.train.unpaired import UnpairedDraws, UnpairedTables, extend_sides, unpaired_counts
from stratalign.train.validation import Validator


class _Run:
    """One run's own state in a group."""

    def __init__(self, job: HeadsJob, model: AlignedHeads, rng: torch.Generator, dev: torch.device) -> None:
        self.job, self.cfg, self.model, self.rng = job, job.cfg, model, rng
        self.obj = objective_named(job.cfg.objective)
        self.loss_key = loss_key(job.cfg, self.obj)
        self.warmup = job.cfg.resolved_warmup()
        self.train_pos = torch.from_numpy(job.train_idx).to(dev)
        self.perm = torch.Generator().manual_seed(job.cfg.seed)
        self.mixup = LatentMixup(job.cfg.mixup_alpha, job.cfg.seed) if job.cfg.mixup_alpha else None  # FuseMix
        self.unpaired = UnpairedDraws(*job.unpaired, job.cfg.unpaired, job.cfg.seed, dev) if job.unpaired else None
        self.epoch: list[torch.Tensor] = []
        self.floor = job.cfg.selection_floor()  # 0: every evaluation step is a candidate, as for every run
        self.sel = CheckpointSelector(self.floor, job.cfg.patience, job.selection, job.cfg.stop_step)
        self.history: list[dict[str, Any]] = [{"step": 0}]
        self.curve: list[dict[str, float]] = []
        self.pending: list[Pending] = []  # steps since the last evaluation, losses still on the device
        self.stop: tuple[int, str, str] | None = None
        self.seconds, self.share = 0.0, 0.0  # the stack's wall time until it stopped; its share of that time
        self.checkpoint: CohortCheckpoint | None = None  # its weights at its cohort's best step (train.cohorts)

    def lam_of(self, step: int) -> float:
        return losses_mod.lambda_at(step, self.cfg.lam, self.warmup) if self.obj.warmup else 0.0

    def weight(self, step: int) -> float:
        return float(self.obj.weight(self.cfg, self.lam_of(step))) if self.obj.regulariser else 0.0

    def next_batch(self) -> torch.Tensor:
        """The next batch of training positions (a new seeded epoch when the last one is used up)."""
        if not self.epoch:
            self.epoch = list(reversed(epoch_batches(len(self.job.train_idx), self.cfg.batch_size, self.perm)))
        return self.epoch.pop()

    def due(self, step: int) -> bool:
        return evaluation_due(step, self.cfg, self.floor)

    def record(self, values: np.ndarray) -> int | None:
        """The pending steps into the history (`values`: their losses on the host); the first non-finite step."""
        rows, bad = history_rows(self.pending, values)
        self.history.extend(rows)
        self.pending.clear()
        return bad

    def evaluated(self, step: int, scores: dict[str, float], state: Callable[[], dict[str, torch.Tensor]]) -> None:
        """Record an evaluation, offer the checkpoint, decide whether the run stops here."""
        lam = float(self.lam_of(step - 1)) if step > 0 else 0.0
        self.curve.append({"step": step, **scores, "lambda": lam})
        self.history[step].update(validation_history(scores))
        rule = self.job.selection
        v = float(scores[rule.key])
        self.sel.offer(step, v, state)
        if self.job.progress is not None:
            self.job.progress(step, self.cfg.max_steps, v)
        if step == 0:
            return
        if not np.isfinite(v):
            self.stop = (step, "non_finite", f"non-finite validation {rule.metric} at step {step}")
        elif self.sel.should_stop(step):
            self.stop = stop_reason(self.cfg, step, rule)
        elif step >= self.cfg.max_steps:
            self.stop = (step, "max_steps", f"reached max_steps={self.cfg.max_steps}")

    def finish(self, dev: torch.device, group_size: int) -> TrainResult:
        """Restore the chosen checkpoint and describe how it was chosen."""
        step, reason, message = self.stop or (0, "max_steps", "")
        best_val, best_step, lam_best, before, message = restore_chosen(self.sel, self.model, self.lam_of, message)
        if group_size > 1:
            message += f"; trained in a batch of {group_size} runs"
        row = self.history[best_step]
        return TrainResult(model=self.model, config=self.cfg, best_step=best_step, lambda_at_best=lam_best,
                           best_val_clip=float(row.get("val_clip", best_val)), warmup_steps=self.warmup,
                           first_candidate=self.floor,
                           steps_taken=step, stopped_reason=reason, message=message, restored_before_warmup=before,
                           history=self.history, seconds=self.seconds, share_seconds=self.share, device=str(dev),
                           selection_metric=self.job.selection.metric, best_value=best_val, val_curve=self.curve,
                           checkpoint=self.checkpoint)


class GroupLoop:
    """The optimisation loop of one group of runs over shared feature tables."""

    def __init__(self, xi: torch.Tensor, xt: torch.Tensor, jobs: list[HeadsJob], models: list[AlignedHeads],
                 rngs: list[torch.Generator], dev: torch.device, on_step: GroupProgress | None = None,
                 unpaired: UnpairedTables | None = None) -> None:
        self.xi, self.xt, self.dev, self.on_step = xi, xt, dev, on_step
        self.unpaired = unpaired if any(unpaired_counts(jobs[0].cfg.unpaired, jobs[0].unpaired)) else None  # group_key
        self.cfg = jobs[0].cfg
        self.runs = [_Run(j, m, g, dev) for j, m, g in zip(jobs, models, rngs)]
        self.active = list(self.runs)  # stack order
        self.image = StackedSide([m.image for m in models])
        self.text = StackedSide([m.text for m in models])
        self.variational = self.image.variational
        self.bf16 = self.cfg.autocast_bf16(dev)
        self.lean = self.bf16 and not any(r.mixup for r in self.runs)  # the lean step (module docstring)
        self.frozen = FrozenSides(xi, xt, [r.train_pos for r in self.runs]) if self.lean else None
        self.opt = self._optimiser()
        self.validators: dict[tuple, Validator] = {}
        self.cohorts = CohortTracker(self.runs)
        self.t0 = time.perf_counter()

    # ---------------------------------------------------------------- the stack

    def _optimiser(self) -> RunsAdamW:
        c = self.cfg
        return RunsAdamW(self.image.tensors() + self.text.tensors(), lr=c.lr, betas=c.betas, weight_decay=c.weight_decay,
                         stacked=True)

    def _state(self, s: int) -> Callable[[], dict[str, torch.Tensor]]:
        def state() -> dict[str, torch.Tensor]:
            return {**{f"image.{n}": v for n, v in self.image.state(s).items()},
                    **{f"text.{n}": v for n, v in self.text.state(s).items()}}

        return state

    def _compact(self) -> None:
        """Drop stopped runs from the stack and from the optimiser (the others keep their tensors and state)."""
        keep = [i for i, r in enumerate(self.active) if r.stop is None]
        self.image.keep(keep)
        self.text.keep(keep)
        self.active = [self.active[i] for i in keep]
        self.opt.keep(self.image.tensors() + self.text.tensors(), keep)

    # ---------------------------------------------------------------- one step

    def _sides(self, pos: torch.Tensor) -> tuple[Side, Side]:
        """Both sides of the stacked batch (S, b): inputs (mixed for runs with FuseMix mixup), embeddings (VIB:
        sampled, with mu and logvar)."""
        rows = pos.flatten()  # (index_select: a 2-D index through `table[pos]` gathered ~10x slower on a CPU)
        a, t = mix_runs(self.xi.index_select(0, rows).view(*pos.shape, -1),
                        self.xt.index_select(0, rows).view(*pos.shape, -1), [r.mixup for r in self.active])
        gens = [r.rng for r in self.active]
        if self.frozen is not None and not self.variational:  # the lean step: float32 unit rows from bf16 products
            fi, ft = self.frozen.sides(pos)
            return (Side(a, self.image.forward_lean(a, gens), frozen=fi, unit=True),
                    Side(t, self.text.forward_lean(t, gens), frozen=ft, unit=True))
        oi, ot = self.image.forward(a, gens), self.text.forward(t, gens)
        if not self.variational:
            return Side(a, canonical_grad(oi)), Side(t, canonical_grad(ot))
        (mu_i, lv_i), (mu_t, lv_t) = oi, ot
        zi = torch.stack([VariationalHead.sample(mu_i[s].float(), lv_i[s].float(), r.cfg.vib_scale, r.rng)
                          for s, r in enumerate(self.active)])
        zt = torch.stack([VariationalHead.sample(mu_t[s].float(), lv_t[s].float(), r.cfg.vib_scale, r.rng)
                          for s, r in enumerate(self.active)])
        return Side(a, zi, mu_i, lv_i), Side(t, zt, mu_t, lv_t)

    def _regularisers(self, rows: torch.Tensor, image: Side, text: Side, weights: list[float]) -> torch.Tensor:
        """(S,) regulariser values: one call per run of consecutive runs with one objective and settings (the
        group is ordered that way: `train_heads_many`), on slices of the stacks; zeros for runs without one.
        Slices (not an index) keep every run's gradient bit for bit what it is alone. A run whose weight is 0 at
        this step (lambda = 0, or the warm-up's first step) gets no regulariser at all, not 0 x its value: its
        step is then CLIP's step bit for bit (docs/method.md § 3.8, the zero-weight invariant; a regulariser's zero gradient
        still changes how autograd lays out the embedding's gradient, which moved weights by ~1e-8)."""
        parts: list[torch.Tensor] = []
        keys = [r.loss_key if w != 0.0 else "" for r, w in zip(self.active, weights)]
        s, n = 0, len(self.active)
        while s < n:
            first = self.active[s]
            e = s + 1
            while e < n and keys[e] == keys[s]:
                e += 1
            if not keys[s]:
                parts.append(torch.zeros(e - s, device=self.dev))
            elif first.obj.batched:
                batch = StepBatch(rows[s:e], slice_side(image, s, e), slice_side(text, s, e))
                parts.append(first.obj.regulariser(batch, first.cfg).float())
            else:  # run by run (the kNN form: each run's head over its own neighbour table)
                for k in range(s, e):
                    r = self.active[k]
                    batch = StepBatch(rows[k], self._one_side(image, k, self.image, self.xi, r),
                                      self._one_side(text, k, self.text, self.xt, r))
                    parts.append(r.obj.regulariser(batch, r.cfg).float().view(1))
            s = e
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _one_side(self, side: Side, s: int, stack: StackedSide, table: torch.Tensor, run: _Run) -> Side:
        knn = None
        if run.job.graphs is not None:
            graph = run.job.graphs[0] if stack is self.image else run.job.graphs[1]
            knn = KnnSupport(stack.one(s, run.rng), table[run.train_pos], graph)
        mu, logvar = (None, None) if side.mu is None else (side.mu[s], side.logvar[s])
        return Side(side.x[s], side.z[s], mu, logvar, knn)

    def step(self, step: int) -> torch.Tensor:
        """One optimiser step of every active run; (S, 3) [loss, clip, reg] per run, left on the device."""
        batch_pos = torch.stack([r.next_batch().to(self.dev) for r in self.active])  # (S, b) training positions
        pos = torch.stack([r.train_pos[p] for r, p in zip(self.active, batch_pos)])  # (S, b) table rows
        step_weights = [r.weight(step) for r in self.active]
        weights = torch.tensor(step_weights, device=self.dev)
        with autocast(self.dev, self.bf16):
            image, text = self._sides(pos)
            clip = (clip_loss_stacked if self.lean else losses_mod.clip_loss)(image.z, text.z, self.cfg.tau)
            if self.unpaired is not None and any(step_weights):  # § 3.11: unpaired rows after the pairs, R_S only
                image, text = extend_sides(image, text, (self.image, self.text), self.unpaired,
                                           [r.unpaired for r in self.active])
            reg = self._regularisers(batch_pos, image, text, step_weights)
            loss = clip + weights * reg
        self.opt.zero_grad()
        loss.sum().backward()
        # each run's own clip per head, on its own tensors (as alone)
        if self.lean:
            clip_stacked_per_run([[w.grad for w in side.tensors() if w.grad is not None]
                                  for side in (self.image, self.text)], 1.0)
        else:
            clip_grads_per_run([side.grads(s) for s in range(len(self.active)) for side in (self.image, self.text)],
                               1.0)
        self.opt.step()
        return torch.stack([loss.detach(), clip.detach(), reg.detach()], 1).float()

    # ---------------------------------------------------------------- evaluation

    def _validator(self, run: _Run) -> Validator:
        """One validator per (validation rows, targets, chunk size): the runs that share them are scored together."""
        key = (run.job.val_idx.tobytes(), id(run.job.targets), run.cfg.batch_size)
        if key not in self.validators:
            va = torch.from_numpy(run.job.val_idx).to(self.dev)
            self.validators[key] = Validator(self.xi[va], self.xt[va], run.job.targets, self.cfg.tau,
                                             run.cfg.batch_size)
        return self.validators[key]

    def evaluate(self, step: int, due: list[int]) -> None:
        """Score the due runs (positions in the stack) on validation, bucketed by their validator."""
        buckets: dict[int, list[int]] = {}
        for s in due:
            v = self._validator(self.active[s])
            buckets.setdefault(id(v), []).append(s)
        for members in buckets.values():
            validator = self._validator(self.active[members[0]])

            def embed(modality: str, x: torch.Tensor, runs: list[int] = members) -> torch.Tensor:
                stack = self.image if modality == "image" else self.text
                with autocast(self.dev, self.bf16):
                    return stack.embed(x.unsqueeze(0).expand(len(runs), -1, -1), runs)

            for s, scores in zip(members, validator.score_many(embed)):
                self.active[s].evaluated(step, scores, self._state(s))
        self.cohorts.offer(step, self.active, self._state)

    # ---------------------------------------------------------------- the loop

    def run(self) -> list[TrainResult]:
        max_steps, total_runs = self.cfg.max_steps, len(self.runs)
        tick, stepped = time.perf_counter(), list(self.active)
        with torch.no_grad():
            self.evaluate(0, list(range(len(self.active))))
        step, done_steps = 0, 0
        while self.active and step < max_steps:
            tick, stepped = self._share(stepped, tick), list(self.active)
            lr = self.opt.lr
            lams = [r.lam_of(step) for r in self.active]
            losses = self.step(step)
            step += 1
            done_steps += len(self.active)
            self.opt.lr = self.cfg.lr * cosine_factor(step, max_steps)  # cosine schedule (LambdaLR's arithmetic)
            for s, r in enumerate(self.active):
                r.pending.append((step, lr, lams[s], losses[s]))
            due = [s for s, r in enumerate(self.active) if r.due(step)]
            if due:
                self._checkpoint(step, due)
            if self.on_step is not None:
                planned = done_steps + len(self.active) * (max_steps - step)
                self.on_step(done_steps, planned, sum(r.stop is not None for r in self.runs), total_runs)
        self._share(stepped, tick)
        return [r.finish(self.dev, total_runs) for r in self.runs]

    @staticmethod
    def _share(runs: list[_Run], since: float) -> float:
        """Divide the time since `since` among the runs that step moved (the bake-off's cost of a run)."""
        now = time.perf_counter()
        for r in runs:
            r.share += (now - since) / len(runs)
        return now

    def _checkpoint(self, step: int, due: list[int]) -> None:
        """Move the due runs' step losses into their histories (off the device in one transfer), evaluate them,
        drop the runs that stop."""
        counts = [len(self.active[s].pending) for s in due]
        values = torch.stack([p[3] for s in due for p in self.active[s].pending]).cpu().numpy()
        scored, start = [], 0
        for s, n in zip(due, counts):
            r = self.active[s]
            bad = r.record(values[start:start + n])
            start += n
            if bad is not None:
                del r.history[bad + 1:]
                r.stop = (bad, "non_finite", f"non-finite training loss at step {bad}")
            else:
                scored.append(s)
        with torch.no_grad():
            self.evaluate(step, scored)
        now = time.perf_counter() - self.t0
        for s in due:
            if self.active[s].stop is not None:
                self.active[s].seconds = now
        if any(r.stop is not None for r in self.active):
            self._compact()


def train_heads_many(xi: torch.Tensor, xt: torch.Tensor, jobs: list[HeadsJob], dev: torch.device, *,
                     on_step: GroupProgress | None = None, max_group: int = 64,
                     unpaired: UnpairedTables | None = None) -> list[TrainResult]:
    """Train every job on the device tables xi / xt (rows = pairs), grouped as `group_key` says, at most
    `max_group` runs a group; the results in job order. on_step(steps done, steps planned, runs finished, runs)
    is called after every step with the totals over all groups."""
    dims = (int(xi.shape[1]), int(xt.shape[1]))
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(group_key(job, dims), []).append(i)
    for members in groups.values():  # runs of one regulariser next to each other (see GroupLoop._regularisers)
        members.sort(key=lambda i: loss_key(jobs[i].cfg, objective_named(jobs[i].cfg.objective)))
    chunks = [m[a:a + max_group] for m in groups.values() for a in range(0, len(m), max_group)]
    results: list[TrainResult | None] = [None] * len(jobs)
    planned = [len(c) * jobs[c[0]].cfg.max_steps for c in chunks]
    done_before, finished_before = 0, 0

    def tick(done: int, plan: int, finished: int, _runs: int, k: int = 0) -> None:
        if on_step is not None:
            on_step(done_before + done, done_before + plan + sum(planned[k + 1:]), finished_before + finished,
                    len(jobs))

    for k, members in enumerate(chunks):
        built = [init_run_heads(jobs[i].cfg, dims[0], dims[1], dev) for i in members]
        loop = GroupLoop(xi, xt, [jobs[i] for i in members], [m for m, _ in built], [g for _, g in built], dev,
                         on_step=lambda d, p, f, r, k=k: tick(d, p, f, r, k), unpaired=unpaired)
        for i, res in zip(members, loop.run()):
            results[i] = res
            done_before += res.steps_taken
        finished_before += len(members)
    return [r for r in results if r is not None]
