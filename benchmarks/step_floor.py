"""The trainer's step against its floor (issue 30): ms per run-step of a stack of S runs (train.heads_loop.GroupLoop,
clip+structure, two linear heads 384-d -> 512-d, batch 256 of 1,000 pairs) in fp32 and bf16, against the dense
products that step cannot avoid, timed alone in fp32 and in bf16 (CPU or CUDA autocast), at S = 1, 8, 32.

The floor of one run-step: per side, the head's forward (b x 384 @ 384 x 512) and its weight gradient; the CLIP
similarities (b x 512 @ 512 x b) and their two gradients; R_S's frozen Gram (b x 384 @ 384 x b) per side and the
output Gram with its two gradients per side; each as one batched product over the S runs. That is the floor the
issue's goal was set against; the lean step does fewer products than it counts (the frozen Gram comes from one
Gram matrix of the training rows, and the output Gram's gradient is one product, (G + G^T) U), 436 M multiply-adds a
run-step against 554 M. So two more floors time only the products the lean step performs: "floor own" all in bf16,
"own rule" with the similarity products in float32 as METHOD 3.6 asks; the line before the last gives the step
against each: how far the step is from its own products. Variants alternate in
one process (the machine may be shared); medians of --repeats rounds (`--stat min`: the fastest round, steadier
where other processes share the cores). bf16 rows need bf16 hardware (device.py). The bf16 step is the lean step
(train.heads_loop: hand-written CLIP / R_S backwards, R_S's frozen side from a Gram matrix; the losses in float32,
which the all-bf16 floor does not ask of its products). The last line is the bf16 trainer step over the bf16 floor
at S = 8; the line before it gives the floor METHOD 3.6 allows ("floor rule": the losses are float32, so the
similarity products are timed in fp32 and only the heads' products in bf16) and the step over it.

Run: python benchmarks/step_floor.py [--sizes 1,8,32] [--steps 6] [--repeats 3] [--stat median|min] [--device cpu]
     [--threads N]
"""

from __future__ import annotations

# first: stratalign's thread policy (OMP_WAIT_POLICY) holds only if set before torch loads, as users get it
import stratalign  # noqa: F401

# isort: split
import argparse
import contextlib
import statistics
import time

import numpy as np
import torch

from stratalign.device import bf16_supported, resolve_device
from stratalign.train import TrainConfig
from stratalign.train.heads_init import init_run_heads
from stratalign.train.heads_loop import GroupLoop, HeadsJob
from stratalign.train.rules import SelectionRule, autocast
from stratalign.train.validation import ValidationTargets

D_IN, D_OUT, N, B = 384, 512, 1000, 256


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def trainer(S: int, precision: str, dev: torch.device, xi: torch.Tensor, xt: torch.Tensor):
    """A GroupLoop of S clip+structure runs; returns a function running k steps and giving ms per run-step."""
    jobs = [HeadsJob(TrainConfig(objective="clip+structure", dim=D_OUT, batch_size=B, max_steps=10_000, seed=s,
                                 warmup_steps=100, device=dev.type, precision=precision),
                     np.arange(N), np.arange(10), ValidationTargets.pairs_only(10), SelectionRule("rsum", "rsum", True))
            for s in range(S)]
    built = [init_run_heads(j.cfg, D_IN, D_IN, dev) for j in jobs]
    loop = GroupLoop(xi, xt, jobs, [m for m, _ in built], [g for _, g in built], dev)
    count = [0]

    def run(k: int) -> float:
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(k):
            loop.step(count[0] + 200)  # past the warm-up: lambda at full strength
            count[0] += 1
        _sync(dev)
        return 1000 * (time.perf_counter() - t0) / (k * S)

    return run


def floor(S: int, bf16: bool, dev: torch.device, similarities_fp32: bool = False, own: bool = False):
    """The dense products of S run-steps as batched matmuls; returns a function giving ms per run-step.
    `similarities_fp32` (with bf16): the floor METHOD 3.6 allows, the heads' products in bf16 and the similarity
    products (the Grams, CLIP's logits and their gradients: what the losses are computed from) in float32.
    `own`: only the products the lean step performs (no frozen Gram, one gradient of the output Gram)."""
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(S, B, D_IN, device=dev, generator=g)
    w = torch.randn(S, D_IN, D_OUT, device=dev, generator=g)
    z = torch.randn(S, B, D_OUT, device=dev, generator=g)
    a = torch.randn(S, B, B, device=dev, generator=g)
    fp32 = autocast(dev, False) if similarities_fp32 else contextlib.nullcontext()

    def once() -> None:
        for _side in range(2):
            torch.bmm(x, w)  # head forward
            torch.bmm(x.mT, z)  # its weight gradient
            with fp32:
                if not own:
                    torch.bmm(x, x.mT)  # R_S frozen Gram
                torch.bmm(z, z.mT)  # R_S output Gram
                torch.bmm(a, z)  # its two gradients (the lean step: one, of the symmetrised gradient)
                if not own:
                    torch.bmm(a.mT, z)
        with fp32:
            torch.bmm(z, z.mT)  # CLIP similarities
            torch.bmm(a, z)  # and their two gradients
            torch.bmm(a.mT, z)

    def run(k: int) -> float:
        _sync(dev)
        t0 = time.perf_counter()
        with autocast(dev, bf16):
            for _ in range(k):
                once()
        _sync(dev)
        return 1000 * (time.perf_counter() - t0) / (k * S)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,8,32")
    ap.add_argument("--steps", type=int, default=6, help="steps per timing (after one warm-up round)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stat", choices=("median", "min"), default="median", help="of the rounds' times")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    has_bf16 = bf16_supported(dev)
    rng = np.random.default_rng(0)
    xi = torch.from_numpy(rng.standard_normal((N, D_IN), dtype=np.float32)).to(dev)
    xt = torch.from_numpy(rng.standard_normal((N, D_IN), dtype=np.float32)).to(dev)
    print(f"device {dev}, torch threads {torch.get_num_threads()}, bf16 hardware: {has_bf16}, {args.stat} of "
          f"{args.repeats} rounds", flush=True)
    ratio_s8, rule_s8, own_s8 = None, (0.0, 0.0), (0.0, 0.0)
    for S in [int(s) for s in args.sizes.split(",")]:
        variants = {"step fp32": trainer(S, "fp32", dev, xi, xt), "floor fp32": floor(S, False, dev)}
        if has_bf16:
            variants.update({"step bf16": trainer(S, "bf16", dev, xi, xt), "floor bf16": floor(S, True, dev),
                             "floor rule": floor(S, True, dev, similarities_fp32=True),
                             "floor own": floor(S, True, dev, own=True),
                             "own rule": floor(S, True, dev, similarities_fp32=True, own=True)})
        for run in variants.values():
            run(1)  # warm-up
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.repeats):  # alternate the variants round by round
            for name, run in variants.items():
                times[name].append(run(args.steps))
        pick = statistics.median if args.stat == "median" else min
        med = {k: pick(v) for k, v in times.items()}
        line = ", ".join(f"{k} {v:.2f} ms" for k, v in med.items())
        print(f"S = {S}: ms per run-step: {line}; step fp32 / floor fp32 {med['step fp32'] / med['floor fp32']:.2f}x",
              end="", flush=True)
        if has_bf16:
            print(f", step bf16 / floor bf16 {med['step bf16'] / med['floor bf16']:.2f}x, "
                  f"floor fp32 / floor bf16 {med['floor fp32'] / med['floor bf16']:.2f}x", end="")
            if S == 8:
                ratio_s8 = med["step bf16"] / med["floor bf16"]
                rule_s8 = med["step bf16"] / med["floor rule"], med["floor rule"] / med["floor bf16"]
                own_s8 = med["step bf16"] / med["floor own"], med["step bf16"] / med["own rule"]
        print(flush=True)
    if ratio_s8 is not None:
        print(f"S = 8, the floor METHOD 3.6 allows (heads' products bf16, similarity products fp32): "
              f"step bf16 / rule floor {rule_s8[0]:.2f}x, rule floor / bf16 floor {rule_s8[1]:.2f}x")
        print(f"S = 8, against only the products the lean step performs: step bf16 / own floor (all bf16) "
              f"{own_s8[0]:.2f}x, step bf16 / own rule floor (similarity products fp32) {own_s8[1]:.2f}x")
        print(f"step / bf16 floor: {ratio_s8:.2f}x")
    else:
        print("step / bf16 floor: n/a (no S = 8 or no bf16 hardware)")


if __name__ == "__main__":
    main()
