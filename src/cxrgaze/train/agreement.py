"""The ranks of a ``torchrun`` job agree on where they start, or every rank stops.

Before the first step every rank gathers (:func:`cxrgaze.distributed.all_gather_object`)
what it starts from: the resume point (the epoch of ``last.pt`` and the file's SHA-256, or
none), the resolved config (and its SHA-256), the data version
(:data:`cxrgaze.DATA_VERSION_ENV`) and a fingerprint of the data (train and val image
counts, SHA-256 of ``manifest.csv`` and of the split CSV). Where they differ, every rank
raises the same one-line :class:`~cxrgaze.distributed.RanksDisagree` naming the ranks and
what differs; a rank that could not even load its data stops the others with its reason.
Without this, an ``--out`` that is not shared storage lets one rank resume at epoch 5 while
another starts at epoch 1, and the job deadlocks at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, TypeVar

from cxrgaze import DATA_VERSION_ENV
from cxrgaze.checkpoint import load_checkpoint
from cxrgaze.distributed import DistContext, RanksDisagree, all_gather_object
from cxrgaze.errors import first_line

T = TypeVar("T")


def sha256(path: Path) -> str | None:
    """The file's SHA-256 (hex), None when it does not exist."""
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def start_facts(config: dict[str, Any], prepared_dir: str | Path, split_csv: str | Path, sizes: tuple[int, int],
                last_path: Path | None) -> dict[str, Any]:
    """What this rank starts from; ``last_path``: the ``last.pt`` it resumes from (None: none)."""
    resume = None
    if last_path is not None:
        resume = {"epoch": int(load_checkpoint(last_path)["epoch"]) + 1, "sha256": sha256(last_path)}
    text = json.dumps(config, sort_keys=True, default=str)
    return {"resume": resume, "config": config, "config_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "data_version": os.environ.get(DATA_VERSION_ENV) or None,
            "data": {"train": sizes[0], "val": sizes[1], "manifest": sha256(Path(prepared_dir) / "manifest.csv"),
                     "split": sha256(Path(split_csv))}}


def agreed_start(ctx: DistContext, load: Callable[[], T], facts: Callable[[T], dict[str, Any]]) -> T:
    """``load()`` on every rank, then the check that every rank's ``facts`` agree.

    A rank whose ``load`` or ``facts`` fails raises its own error; the others raise
    :class:`RanksDisagree` quoting it (instead of waiting for it in the first collective).
    In one process: ``load()``.
    """
    error: Exception | None = None
    if not ctx.is_distributed:
        return load()
    try:
        loaded: T | None = load()
        mine = facts(loaded)
    except Exception as exc:
        loaded, error = None, exc
        mine = {"error": first_line(exc, 300)}
    everyone = all_gather_object(mine)
    if error is not None:
        raise error
    failed = [(r, f["error"]) for r, f in enumerate(everyone) if "error" in f]
    if failed:
        raise RanksDisagree("; ".join(f"rank {r} could not start: {msg}" for r, msg in failed))
    message = disagreement(everyone)
    if message is not None:
        raise RanksDisagree(message)
    return loaded  # type: ignore[return-value]


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def _groups(everyone: list[dict[str, Any]], key: str) -> list[tuple[list[int], Any]]:
    """The ranks grouped by their value of ``key``, rank 0's group first."""
    groups: list[tuple[list[int], Any]] = []
    for rank, facts in enumerate(everyone):
        for ranks, value in groups:
            if value == facts[key]:
                ranks.append(rank)
                break
        else:
            groups.append(([rank], facts[key]))
    return groups


def _resume_text(resume: dict[str, Any] | None) -> str:
    if resume is None:
        return "from none (no last.pt)"
    return f"from epoch {resume['epoch']} (last.pt sha256 {resume['sha256'][:12]})"


def _data_text(data: dict[str, Any], plural: bool) -> str:
    short = {k: (v or "none")[:12] for k, v in data.items() if k in ("manifest", "split")}
    return (f"{'have' if plural else 'has'} {data['train']} train / {data['val']} val images (manifest.csv sha256 {short['manifest']}, "
            f"split sha256 {short['split']})")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    return {k: v for key, value in d.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def _config_diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    fa, fb = _flat(a), _flat(b)
    keys = sorted(k for k in fa.keys() | fb.keys() if fa.get(k, ...) != fb.get(k, ...))
    return ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")


def disagreement(everyone: list[dict[str, Any]]) -> str | None:
    """One line naming the ranks that differ and in what (None: they agree)."""
    parts = []
    resume = _groups(everyone, "resume")
    if len(resume) > 1:
        parts.append(", ".join(f"{_ranks(r)} resume{'s' if len(r) == 1 else ''} {_resume_text(v)}" for r, v in resume)
                     + ": --out must be shared storage that every rank sees")
    config = _groups(everyone, "config_sha256")
    if len(config) > 1:
        ref = everyone[0]["config"]
        parts.append("; ".join(f"{_ranks(r)} run{'s' if len(r) == 1 else ''} another config (sha256 {v[:12]}, not "
                               f"{config[0][1][:12]}) differing in {_config_diff(ref, everyone[r[0]]['config'])}"
                               for r, v in config[1:])
                     + ": start every rank with the same --params and options")
    version = _groups(everyone, "data_version")
    if len(version) > 1:
        parts.append(", ".join(f"{_ranks(r)} {'has' if len(r) == 1 else 'have'} data version {v or 'none'}"
                               for r, v in version) + f" ({DATA_VERSION_ENV}): every rank must train on the same data")
    data = _groups(everyone, "data")
    if len(data) > 1:
        parts.append(", ".join(f"{_ranks(r)} {_data_text(v, len(r) > 1)}" for r, v in data)
                     + ": --prepared and --split must hold the same data on every rank")
    return "; ".join(parts) if parts else None
