"""Model tests of `train()`: every variant runs, determinism, resume after a real kill, NaN stop."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cxrgaze import CLASSES
from cxrgaze.checkpoint import load_checkpoint
from cxrgaze.config import VARIANTS, LossConfig, ModelConfig, RunConfig, TrainConfig, resolve_run_config
from cxrgaze.train import TrainingDiverged, train

from conftest import tool_env

TINY_MODEL = ModelConfig(encoder="tu-tinynet_e", decoder_channels=(32, 16, 16, 8, 8))


def tiny_config(variant: str = "unet", **train_kw) -> RunConfig:
    kw = {"epochs": 1, "batch_size": 16, "lr": 3e-3, "variant": variant, "device": "cpu", **train_kw}
    return RunConfig(model=TINY_MODEL, loss=LossConfig(), train=TrainConfig(**kw))


def checkpoint_auc(checkpoint: Path, prepared: Path, split_csv: Path, split: str) -> tuple[float, list[float]]:
    """(macro, per-class) one-vs-rest AUC of a checkpoint's model on one split, computed
    here, not by the package's data loading, prediction or metric code: the rows found
    through the split table and manifest, the arrays read with numpy, sigmoid scores of the
    class logits (``cls_loss: bce``), scikit-learn's AUC."""
    from sklearn.metrics import roc_auc_score

    from cxrgaze.models import build_model, class_logits

    ckpt = load_checkpoint(checkpoint)
    assert ckpt["config"]["loss"]["cls_loss"] == "bce"
    model = build_model(TINY_MODEL, variant=ckpt["config"]["train"]["variant"])
    model.load_state_dict(ckpt["model"])
    rows = pd.read_csv(split_csv, dtype={"dicom_id": str}).query("split == @split")
    manifest = pd.read_csv(prepared / "manifest.csv", dtype={"dicom_id": str}).set_index("dicom_id")
    index = manifest.loc[rows["dicom_id"], "index"].to_numpy()
    images = torch.from_numpy(np.load(prepared / "images.npy")[index].astype(np.float32)).unsqueeze(1)
    with torch.no_grad():
        scores = torch.sigmoid(class_logits(model.eval(), images)).numpy()
    labels = np.array([CLASSES.index(c) for c in rows["label"]])
    per_class = [float(roc_auc_score(labels == k, scores[:, k])) for k in range(len(CLASSES))]
    return float(np.mean(per_class)), per_class


def separable_prepared(root: Path, per_class: dict[str, int], seed: int = 0, size: int = 32) -> tuple[Path, Path]:
    """A prepared folder and split table of a task a small network learns in a few epochs:
    each class is a bright blob at its own place on noise, the gaze on the blob; one image
    per patient."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    centres = [(size // 4, size // 4), (size // 4, 3 * size // 4), (3 * size // 4, size // 2)]  # one per class
    images, gaze, rows = [], [], []
    for split, n in per_class.items():
        for k, label in enumerate(CLASSES):
            blob = np.exp(-((yy - centres[k][0]) ** 2 + (xx - centres[k][1]) ** 2) / 18.0)  # (S, S)
            for _ in range(n):
                i = len(rows)
                images.append(np.clip(0.3 + 0.1 * rng.standard_normal((size, size)) + 0.6 * blob, 0, 1))
                gaze.append(blob)
                rows.append({"dicom_id": f"d{i}", "patient_id": f"p{i}", "study_id": f"s{i}", "label": label,
                             "index": i, "split": split})
    root.mkdir(parents=True)
    np.save(root / "images.npy", np.stack(images).astype(np.float16))  # (N, S, S)
    np.save(root / "gaze.npy", np.stack(gaze).astype(np.float16))
    table = pd.DataFrame(rows)
    table[["dicom_id", "patient_id", "study_id", "label", "index"]].to_csv(root / "manifest.csv", index=False)
    table[["dicom_id", "patient_id", "label", "split", "index"]].to_csv(root / "split.csv", index=False)
    return root, root / "split.csv"


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_end_to_end(variant, tiny_prepared, tmp_path):
    """The whole loop for each variant: finite loss terms, validation AUC, checkpoints, metrics.
    (That each objective's loss falls under the optimiser is tests/test_losses.py's job, on a
    fixed batch where the answer does not depend on 36 noisy training images.)"""
    prepared, split = tiny_prepared
    result = train(tiny_config(variant, epochs=2), prepared, split, tmp_path, progress=False)
    assert len(result.history) == 2
    for rec in result.history:
        terms = {k: v for k, v in rec.items() if k.startswith("train_")}
        assert "train_loss" in terms and "train_cls" in terms
        assert all(np.isfinite(v) for v in terms.values()), terms
    assert (tmp_path / "best.pt").exists() and (tmp_path / "last.pt").exists()
    # The reported validation AUC is that of the kept model on the validation images.
    macro, per_class = checkpoint_auc(tmp_path / "best.pt", prepared, split, "val")
    assert result.best["val_auc_macro"] == pytest.approx(macro, abs=1e-6)
    for name, value in zip(CLASSES, per_class):
        assert result.best[f"val_auc_{name}"] == pytest.approx(value, abs=1e-6)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["variant"] == variant and saved["best_epoch"] == result.best_epoch


@pytest.mark.parametrize("variant", ["baseline", "set3-gbp"])
def test_a_separable_task_is_learned(variant, tmp_path):
    """Six epochs on 48 training images of a task a small network can learn: the kept
    model's AUC on held-out test images (never seen in training or selection) is far above
    chance. (Data and training seeds 0-5: best validation AUC at least 0.92, test AUC at
    least 0.97, every class at least 0.96. With a learning rate of 1e-12, the untrained
    network: at most 0.69 on validation, 0.60 on test.)"""
    prepared, split = separable_prepared(tmp_path / "prepared", {"train": 16, "val": 8, "test": 8})
    result = train(tiny_config(variant, epochs=6, batch_size=8), prepared, split, tmp_path / "run", progress=False)
    assert result.best["val_auc_macro"] > 0.85, result.history
    test_macro, test_per_class = checkpoint_auc(tmp_path / "run" / "best.pt", prepared, split, "test")
    assert test_macro > 0.85 and min(test_per_class) > 0.7, test_per_class


def test_best_checkpoint_is_chosen_by_validation_auc(tiny_prepared, tmp_path):
    prepared, split = tiny_prepared
    result = train(tiny_config("baseline", epochs=3), prepared, split, tmp_path, progress=False)
    aucs = [rec["val_auc_macro"] for rec in result.history]
    assert result.best_epoch == int(np.argmax(aucs))
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == result.best_epoch
    assert best["metrics"]["val_auc_macro"] == pytest.approx(max(aucs))
    assert not any(k.startswith("test") for rec in result.history for k in rec)


def test_same_seed_same_metrics(tiny_prepared, tmp_path):
    prepared, split = tiny_prepared
    a = train(tiny_config("set3-gbp", epochs=2), prepared, split, tmp_path / "a", progress=False)
    b = train(tiny_config("set3-gbp", epochs=2), prepared, split, tmp_path / "b", progress=False)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)
    sa = load_checkpoint(tmp_path / "a" / "best.pt")["model"]
    sb = load_checkpoint(tmp_path / "b" / "best.pt")["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_kill_during_training_then_resume_gives_the_uninterrupted_result(tiny_prepared, tmp_path):
    prepared, split = tiny_prepared
    params = tmp_path / "params.yaml"
    params.write_text(
        "model: {encoder: tu-tinynet_e, decoder_channels: [32, 16, 16, 8, 8]}\n"
        "train: {epochs: 4, batch_size: 8, lr: 0.003, device: cpu}\n"
    )
    cmd = [sys.executable, "-m", "cxrgaze.cli", "train", "--variant", "set3-gbp", "--params", str(params),
           "--prepared", str(prepared), "--split", str(split), "--quiet"]
    # Tracked in MLflow (SQLite in tmp_path, the working directory): the killed run resumes in the same run.
    reference = subprocess.run(cmd + ["--out", str(tmp_path / "ref")], env=tool_env(), capture_output=True, text=True,
                               cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(killed)], env=tool_env(), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until at least one epoch is checkpointed, then kill -9
        if (killed / "last.pt").exists():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "last.pt").exists() and not (killed / "metrics.json").exists(), "run finished before the kill"
    done_epochs = load_checkpoint(killed / "last.pt")["epoch"] + 1
    assert done_epochs < 4

    killed_run = json.loads((killed / "run.json").read_text())["run_id"]
    resumed = subprocess.run(cmd + ["--out", str(killed)], env=tool_env(), capture_output=True, text=True, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    ref = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    got = json.loads((killed / "metrics.json").read_text())
    assert got == ref
    ref_hist = load_checkpoint(tmp_path / "ref" / "last.pt")["history"]
    got_hist = load_checkpoint(killed / "last.pt")["history"]
    assert [r["val_auc_macro"] for r in got_hist] == [r["val_auc_macro"] for r in ref_hist]
    assert [r["train_loss"] for r in got_hist] == [r["train_loss"] for r in ref_hist]
    import sqlite3

    assert json.loads((killed / "run.json").read_text())["run_id"] == killed_run, "resumed into the same MLflow run"
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        assert db.execute("SELECT status FROM runs WHERE run_uuid = ?", (killed_run,)).fetchone() == ("FINISHED",)
        steps = db.execute("SELECT step FROM metrics WHERE run_uuid = ? AND key = 'epoch_val_auc_macro' ORDER BY step",
                           (killed_run,)).fetchall()
    assert [s for (s,) in steps] == [1, 2, 3, 4]  # 1-based epochs, each once (the killed epoch replayed, not doubled)


class Interrupted(Exception):
    pass


class StopAfterFirstEpoch:
    def on_epoch_end(self, record):
        raise Interrupted


def test_nan_loss_stops_with_epoch_and_batch_and_keeps_the_last_good_checkpoint(tiny_prepared, tmp_path):
    prepared, split = tiny_prepared
    data = tmp_path / "prepared"
    data.mkdir()
    for f in prepared.iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    config = tiny_config("set3-gbp", epochs=2, batch_size=8)
    with pytest.raises(Interrupted):
        train(config, data, split, tmp_path / "run", progress=False, callbacks=[StopAfterFirstEpoch()])
    good = (tmp_path / "run" / "last.pt").read_bytes()

    images = np.load(data / "images.npy")
    images[:] = np.nan  # every image broken: the first batch of epoch 2 diverges
    np.save(data / "images.npy", images)
    with pytest.raises(TrainingDiverged, match=r"epoch 2, batch 1"):
        train(config, data, split, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "last.pt").read_bytes() == good
    assert load_checkpoint(tmp_path / "run" / "best.pt")["epoch"] == 0


def test_resume_refuses_a_checkpoint_of_another_config(tiny_prepared, tmp_path):
    prepared, split = tiny_prepared
    train(tiny_config("unet"), prepared, split, tmp_path, progress=False)
    with pytest.raises(ValueError, match="different config"):
        train(tiny_config("unet", lr=1e-4), prepared, split, tmp_path, progress=False)


def test_corrupt_checkpoint_is_refused_with_a_message(tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="last.pt: not a readable checkpoint"):
        load_checkpoint(bad)


def test_params_resolve_per_variant_overrides():
    params = {"model": {"dropout": 0.5}, "loss": {"gamma": 0.4}, "train": {"epochs": 3},
              "variants": {"baseline": {"loss": {"gamma": 1.0}, "model": {"dropout": 0.0}}}}
    base = resolve_run_config(params, "baseline")
    unet = resolve_run_config(params, "unet")
    assert (base.loss.gamma, base.model.dropout, base.train.variant) == (1.0, 0.0, "baseline")
    assert (unet.loss.gamma, unet.model.dropout, unet.train.epochs) == (0.4, 0.5, 3)
    with pytest.raises(ValueError, match="unknown variant"):
        resolve_run_config(params, "set4-gbp")


def test_amp_off_survives_yaml_that_lost_its_quotes():
    """The legacy `amp: "off"`: `dvc exp run -S` rewrites params.yaml without quotes, and YAML
    reads `amp: off` as false; both still mean fp32 (the canonical spelling)."""
    import yaml

    params = yaml.safe_load("train:\n  amp: off\n")
    assert params["train"]["amp"] is False
    assert resolve_run_config(params, "unet").train.amp == "fp32"
    with pytest.raises(ValueError, match="train.amp must be 'fp32' or 'bf16'"):
        resolve_run_config(yaml.safe_load("train:\n  amp: on\n"), "unet")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["fp32", "bf16"])
def test_trains_on_cuda(amp, tiny_prepared, tmp_path):
    prepared, split = tiny_prepared
    result = train(tiny_config("set3-gbp", epochs=1, device="cuda", amp=amp), prepared, split, tmp_path, progress=False)
    assert result.device.startswith("cuda")
    assert np.isfinite(result.history[0]["train_loss"])
