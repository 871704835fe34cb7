"""Training-step time and peak memory of every variant, relative to ``unet``.

One step is ``compute_loss`` (forward, generator, loss terms) + ``backward`` + an Adam
step, on a synthetic batch. Variants are interleaved within each round (so slow
drifts of a shared machine hit all of them alike), each timed after a warm-up round;
the table shows medians. Peak memory is measured per variant in a fresh subprocess:
the peak resident set size during the first step above the resident size before it
on CPU (``VmHWM``), ``torch.cuda.max_memory_allocated`` on CUDA.

Run (defaults: CPU, 224 px, batch 8, efficientnet-b0; about 4-5 minutes on 2 cores):

    .venv/bin/python bench/bench_step.py
    .venv/bin/python bench/bench_step.py --device cuda --amp bf16 --batch 32
    .venv/bin/python bench/bench_step.py --variants unet set3-gbp --profile set3-gbp
    .venv/bin/python bench/bench_step.py --variants unet set3-gbp --ablate bn,conv,silu

``--ablate`` turns off this project's second-order speed-ups one by one (to measure
what each buys): ``conv`` (grouped-conv input gradient as ``conv_transpose2d``), ``bn``
(hand-derived batch-norm double backward; ablated, train-mode batch norm runs natively,
so the generator's backward also goes back through the batch statistics again: a map
then mixes the batch's images, a different function), ``silu`` (fused SiLU rule
kernels), ``shared`` (a second, traced forward pass for the generator instead of sharing
the loss's).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext
from typing import Any

import torch

from cxrgaze.config import LossConfig, ModelConfig
from cxrgaze.losses import compute_loss
from cxrgaze.variants import VARIANTS, parse_variant

warnings.filterwarnings("ignore", category=UserWarning)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--amp", default="none", choices=("none", "bf16"), help="autocast dtype")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--encoder", default="efficientnet-b0")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory runs")
    p.add_argument("--profile", metavar="VARIANT", help="print a torch.profiler table of one step")
    p.add_argument("--ablate", default="", help="comma list of: conv, bn, silu, shared")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- ablations: undo one speed-up at a time (bench only; the library has no switches) ---
def apply_ablations(names: set[str]) -> None:
    """Monkeypatch the library back to the plain implementation of each named speed-up."""
    unknown = names - {"conv", "bn", "silu", "shared"}
    if unknown:
        raise SystemExit(f"--ablate: unknown {', '.join(sorted(unknown))}")
    import torch.nn.functional as F

    from cxrgaze.explain import rules, tracing

    if "conv" in names:
        tracing._FAST_OPS.pop(torch.conv2d, None)
    if "bn" in names:
        tracing._FAST_OPS.pop(F.batch_norm, None)
    if "silu" in names:
        class Composite:  # the rule written in plain tensor ops (the first version)
            @staticmethod
            def apply(g: torch.Tensor, x: torch.Tensor, guided: bool) -> torch.Tensor:
                s = torch.sigmoid(x)
                if not guided:
                    return g * s * (1 + x * (1 - s))
                return torch.where(x > 0, torch.relu(g) * s * (1 + x * (1 - s)), 0.0)

        rules.SiLUBackward = Composite  # type: ignore[misc, assignment]
    if "shared" in names:
        import cxrgaze.losses as L
        from cxrgaze.explain import generator_maps
        from cxrgaze.models import class_logits

        original = L.objective

        def two_pass(model, batch, variant, cfg=None):  # noqa: ANN001, ANN202
            """The loss's forward untraced; the generator runs its own traced forward."""
            spec = L.parse_variant(variant)
            if spec.rule is None or spec.objective == "rrr":  # rrr's penalty has no two-pass form here
                return original(model, batch, variant, cfg)
            cfg = cfg or LossConfig()
            image, gaze, label = batch["image"], batch["gaze"], batch["label"]
            if spec.objective == "set1":
                mask, logits = None, class_logits(model, image)
            else:
                mask, logits = model(image)
            total = cfg.gamma * L.classification_loss(logits, label, cfg.cls_loss)
            train_map = spec.objective != "set2" or not cfg.detach_generator_target
            h = generator_maps(model, image, label, spec.rule, create_graph=train_map)
            w = 1.0 - cfg.gamma
            if spec.objective == "set1":
                total = total + w * L.map_loss(h, gaze, cfg.map_loss, eps=cfg.eps)
            elif spec.objective == "set2":
                goal = h.detach() if cfg.detach_generator_target else h
                total = total + w * L.map_loss(mask, goal, cfg.map_loss, logits=True)
            else:
                total = total + w * (cfg.alpha * L.map_loss(mask, gaze, cfg.map_loss, logits=True)
                                     + (1 - cfg.alpha) * L.map_loss(h, gaze, cfg.map_loss, eps=cfg.eps))
            return L.LossOutput(total, {"loss": total.detach()}, logits, mask, h)

        L.objective = two_pass


# --- one step ------------------------------------------------------------------------
def _kind(variant: str) -> str:
    """The architecture a variant trains: ``unet`` (decoder) or ``baseline`` (encoder + head)."""
    return "unet" if parse_variant(variant).has_decoder else "baseline"


class Stepper:
    """Models, optimizers and a fixed synthetic batch; ``step(variant)`` runs one step."""

    def __init__(self, args: argparse.Namespace) -> None:
        from cxrgaze.models import build_model

        self.device = torch.device(args.device)
        torch.manual_seed(0)
        config = ModelConfig(encoder=args.encoder)
        self.models: dict[str, torch.nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        for kind in {_kind(v) for v in args.variants}:
            model = build_model(config, variant=kind).to(self.device).train()
            self.models[kind] = model
            self.optimizers[kind] = torch.optim.Adam(model.parameters(), lr=1e-4)
        b, s = args.batch, args.size
        gen = torch.Generator().manual_seed(0)
        self.batch = {
            "image": torch.rand(b, 1, s, s, generator=gen).to(self.device),
            "gaze": torch.rand(b, 1, s, s, generator=gen).to(self.device),
            "label": torch.randint(0, 3, (b,), generator=gen).to(self.device),
        }
        self.loss_config = LossConfig()
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if args.amp == "bf16" else nullcontext()
        )

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, variant: str) -> dict[str, float]:
        """Seconds of one training step of ``variant``: ``wall``, process ``cpu``, and the
        wall-clock parts ``forward`` (forward and loss terms), ``generator`` (the
        generator's gradient call) and ``backward`` (backward and optimizer step)."""
        kind = _kind(variant)
        model, optimizer = self.models[kind], self.optimizers[kind]
        self.sync()
        _GENERATOR_SECONDS[0] = 0.0
        wall, cpu = time.perf_counter(), time.process_time()
        with self.autocast:
            loss, _ = compute_loss(model, self.batch, variant, self.loss_config)
        self.sync()
        mid = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        self.sync()
        end = time.perf_counter()
        generator = _GENERATOR_SECONDS[0]
        return {"wall": end - wall, "cpu": time.process_time() - cpu, "forward": mid - wall - generator,
                "generator": generator, "backward": end - mid}


_GENERATOR_SECONDS = [0.0]


def time_generator_calls(device: torch.device) -> None:
    """Accumulate the wall time of every ``Trace.attribute`` call into ``_GENERATOR_SECONDS``."""
    from cxrgaze.explain import tracing

    original = tracing.Trace.attribute

    def timed(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            _GENERATOR_SECONDS[0] += time.perf_counter() - start

    tracing.Trace.attribute = timed


def _status_bytes(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak resident size) of this process, from /proc."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current resident size (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def memory_child(args: argparse.Namespace) -> None:
    """Peak memory of one step of ``args.memory_child`` (run in a fresh process).

    CPU: the peak resident size during the first step above the resident size before it
    (a later step would reuse heap memory that the allocator kept from the first, and
    ``ru_maxrss`` would not do: Linux carries it over from the parent process); this
    includes the optimizer's state, the same for every U-Net variant. CUDA:
    ``max_memory_allocated`` during a second step above the memory allocated before it.
    """
    stepper = Stepper(args)
    variant = args.memory_child
    if stepper.device.type == "cuda":
        stepper.step(variant)
        torch.cuda.reset_peak_memory_stats(stepper.device)
        base = torch.cuda.memory_allocated(stepper.device)
        stepper.step(variant)
        peak = torch.cuda.max_memory_allocated(stepper.device) - base
    else:
        gc.collect()
        _reset_peak_rss()  # VmHWM is fresh after exec anyway; this drops setup peaks
        base = _status_bytes("VmRSS")
        stepper.step(variant)
        peak = _status_bytes("VmHWM") - base
    print(json.dumps({"variant": variant, "peak_bytes": peak}))


def measure_memory(args: argparse.Namespace, argv: list[str]) -> dict[str, float]:
    peaks = {}
    for variant in args.variants:
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--_memory-child", variant]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"memory run of {variant} failed:\n{proc.stderr[-2000:]}")
        peaks[variant] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"] / 2**20
    return peaks


def profile_one(stepper: Stepper, variant: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    stepper.step(variant)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if stepper.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        stepper.step(variant)
    sort = "self_cuda_time_total" if stepper.device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=30))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    apply_ablations({a for a in args.ablate.split(",") if a})
    if args.memory_child:
        memory_child(args)
        return
    stepper = Stepper(args)
    if args.profile:
        profile_one(stepper, args.profile)
        return

    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"amp {args.amp}, batch {args.batch}, {args.size} px, {args.encoder}, torch {torch.__version__}"
          + (f", ablated: {args.ablate}" if args.ablate else ""), flush=True)
    time_generator_calls(stepper.device)
    samples: dict[str, list[dict[str, float]]] = {v: [] for v in args.variants}
    for r in range(args.rounds + 1):
        for variant in args.variants:
            parts = stepper.step(variant)
            if r > 0:  # round 0 warms up
                samples[variant].append(parts)
        print(f"round {r}/{args.rounds} done", file=sys.stderr, flush=True)
    del stepper
    peaks = {} if args.no_memory else measure_memory(args, argv)

    def median(variant: str, part: str) -> float:
        return statistics.median(p[part] for p in samples[variant])

    ref = "unet" if "unet" in args.variants else args.variants[0]
    rows: list[dict[str, Any]] = []
    for v in args.variants:
        wall = median(v, "wall")
        rows.append({
            "variant": v, "step_s": wall, "x_ref": wall / median(ref, "wall"),
            "cpu_x_ref": median(v, "cpu") / median(ref, "cpu"), "images_per_s": args.batch / wall,
            "peak_mib": peaks.get(v), "peak_x_ref": peaks[v] / peaks[ref] if peaks else None,
            "forward_s": median(v, "forward"), "generator_s": median(v, "generator"),
            "backward_s": median(v, "backward"), "samples": samples[v],
        })
    print(f"\n| variant | step (s) | x {ref} | CPU time x {ref} | images/s | peak memory (MiB) | x {ref} "
          "| forward + loss (s) | generator (s) | backward + step (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        mem = f"{row['peak_mib']:.0f} | {row['peak_x_ref']:.2f}" if peaks else "- | -"
        print(f"| {row['variant']} | {row['step_s']:.2f} | {row['x_ref']:.2f} | {row['cpu_x_ref']:.2f} | "
              f"{row['images_per_s']:.1f} | {mem} | {row['forward_s']:.2f} | {row['generator_s']:.2f} | "
              f"{row['backward_s']:.2f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
