"""Resampled AUC: the vectorised ``auc_resampled`` against the sklearn loop it replaces.

Both score the SAME bootstrap indices (full-size resamples of synthetic 3-class scores,
rounded to 2 decimals so that scores tie) and must agree to 1e-12 (the maximum absolute
difference is printed; the run fails otherwise). The vectorised version is timed as the
median of ``--repeats`` runs after a warm-up, the loop once (it is the slow one); the
table shows both and their ratio.

Run (defaults: 300 cases, 2000 resamples; the loop takes about 10-30 s on 2 busy cores):

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_bootstrap.py
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_bootstrap.py --cases 1000 --resamples 500
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from cxrgaze.evaluation.bootstrap import auc_resampled, auc_resampled_loop, bootstrap_indices


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=300, help="test cases N")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples R")
    p.add_argument("--seed", type=int, default=0, help="seed of the scores and of the resamples")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of the vectorised version")
    return p.parse_args(argv)


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels (N,) in 0..2 and scores (N, 3): one unit of signal on the true class plus
    standard normal noise, rounded to 2 decimals."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    return y, np.round(np.eye(3)[y] + rng.normal(size=(n, 3)), 2)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    y, scores = synthetic(args.cases, args.seed)
    indices = bootstrap_indices(args.cases, args.resamples, args.seed)  # (R, N)
    print(f"{args.cases} cases, {args.resamples} resamples, 3 classes, seed {args.seed}, numpy {np.__version__}",
          flush=True)

    auc_resampled(y, scores, indices)  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        fast = auc_resampled(y, scores, indices)
        times.append(time.perf_counter() - start)
    fast_s = statistics.median(times)

    start = time.perf_counter()
    slow = auc_resampled_loop(y, scores, indices)
    slow_s = time.perf_counter() - start

    same_nan = np.array_equal(np.isnan(fast), np.isnan(slow))
    max_diff = float(np.nanmax(np.abs(fast - slow), initial=0.0))
    print(f"max |vectorised - loop| = {max_diff:.3g} (NaN at the same places: {same_nan})")
    if not same_nan or max_diff > 1e-12:
        raise SystemExit("the two implementations disagree")

    print("\n| implementation | time (s) | resamples/s | x loop |")
    print("|---|---:|---:|---:|")
    print(f"| auc_resampled_loop (sklearn per resample and class) | {slow_s:.3f} | "
          f"{args.resamples / slow_s:.0f} | 1.0 |")
    print(f"| auc_resampled (vectorised, median of {args.repeats}) | {fast_s:.4f} | "
          f"{args.resamples / fast_s:.0f} | {slow_s / fast_s:.0f} |")


if __name__ == "__main__":
    main()
