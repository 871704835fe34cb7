"""One typed source of configuration: ``params.yaml`` sections as frozen dataclasses.

Each DVC stage names the exact ``params.yaml`` keys it reads; the library receives the
resolved dataclass, and checkpoints and MLflow runs carry ``dataclasses.asdict`` of it.
Unknown keys are an error (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from cxrgaze.variants import VARIANTS, parse_variant  # noqa: F401  (VARIANTS re-exported)

T = TypeVar("T")


class ConfigError(ValueError):
    """A ``params.yaml`` section that cannot be turned into its dataclass."""


@dataclass(frozen=True)
class DataConfig:
    """How ``prepare`` turns DICOMs and fixations into training arrays (``params.yaml: data``)."""

    image_size: int = 224
    """Side of the square arrays written by ``prepare`` (pixels)."""
    resize: str = "stretch"
    """``stretch``: scale each axis to ``image_size`` like the reference code (aspect ratio
    not kept); ``pad``: scale the long side to ``image_size`` and centre the image on a black
    square (aspect kept). Gaze coordinates go through the same mapping either way."""
    gaze_sigma: float = 150.0
    """Gaussian sigma of the static gaze heatmap, in original-image pixels (reference: 150)."""
    gaze_duration_weighted: bool = False
    """Weight each fixation by its duration ``FPOGD`` instead of +1 (the reference uses +1)."""
    workers: int = 0
    """Decoding processes for ``prepare``; 0 means one per CPU core."""

    def __post_init__(self) -> None:
        if self.resize not in ("stretch", "pad"):
            raise ConfigError(f"data.resize must be 'stretch' or 'pad', got {self.resize!r}")
        if self.image_size < 8:
            raise ConfigError(f"data.image_size must be at least 8, got {self.image_size}")
        if self.gaze_sigma <= 0:
            raise ConfigError(f"data.gaze_sigma must be positive, got {self.gaze_sigma}")


@dataclass(frozen=True)
class SplitConfig:
    """Patient-level train/val/test split (``params.yaml: split``).

    The defaults keep a third of the patients for test, so that the synthetic default
    (420 patients) has a shortcut-free test split of more than 150 images: a 95 % CI of a
    macro AUC near 0.7 is then about +-0.07 wide, narrower than the gaps it must resolve.
    The synthetic generator aligns its shortcut marker to this split (``cxrgaze synth``
    uses these defaults).
    """

    seed: int = 42
    train: float = 0.55
    val: float = 0.12
    test: float = 0.33

    def __post_init__(self) -> None:
        parts = (self.train, self.val, self.test)
        if any(p < 0 for p in parts) or abs(sum(parts) - 1.0) > 1e-6:
            raise ConfigError(f"split fractions must be non-negative and sum to 1, got {parts}")


def _non_negative(value: Any) -> bool:
    """A finite number >= 0 (not a bool, not a string)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def from_mapping(cls: type[T], mapping: Mapping[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, refusing keys it does not know.

    Lists become tuples so that the result stays hashable and frozen.
    """
    mapping = dict(mapping or {})
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {', '.join(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in mapping.items()}
    try:
        return cls(**values)
    except TypeError as exc:  # pragma: no cover - dataclass signature errors
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read ``params.yaml`` (or any YAML mapping) into a plain dict."""
    path = Path(path)
    try:
        with path.open() as fh:
            params = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such parameters file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return params


def overlay(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` merged in, mapping by mapping (a profile overlay: it states
    only what differs; a list or a scalar in ``changes`` replaces the base's value)."""
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = overlay(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_section(cls: type[T], section: str, path: str | Path = "params.yaml") -> T:
    """``from_mapping(cls, load_params(path)[section])`` with errors that name the file."""
    return from_mapping(cls, load_params(path).get(section), where=f"{path}: {section}")


def to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as plain data (for checkpoints, MLflow params, JSON)."""
    return dataclasses.asdict(config)


@dataclass(frozen=True)
class ModelConfig:
    """The network (``params.yaml: model``); see ``cxrgaze.models.build_model``.

    The variant decides whether there is a decoder (``baseline``: encoder and head only).
    """

    encoder: str = "efficientnet-b0"
    """Any segmentation_models_pytorch encoder name (``efficientnet-b0``,
    ``timm-efficientnet-b0`` as in the reference code, ``resnet18``, ``tu-<timm name>``)."""
    encoder_weights: str | None = None
    """``None`` (random init), a name smp downloads (``imagenet``; needs network), or the
    path of a local encoder state-dict file (``.pt``/``.pth``/``.safetensors``)."""
    num_classes: int = 3
    dropout: float = 0.5
    """Dropout before the classification layer (reference: 0.5 for the U-Net, 0 for the baseline)."""
    pooling: str = "avg"
    """Pooling of the classification head: ``avg`` (reference) or ``max``."""
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)

    def __post_init__(self) -> None:
        if self.pooling not in ("avg", "max"):
            raise ConfigError(f"model.pooling must be 'avg' or 'max', got {self.pooling!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes < 2:
            raise ConfigError(f"model.num_classes must be at least 2, got {self.num_classes}")
        if len(self.decoder_channels) != 5 or any(c < 1 for c in self.decoder_channels):
            raise ConfigError(f"model.decoder_channels must be 5 positive ints, got {self.decoder_channels}")


@dataclass(frozen=True)
class LossConfig:
    """The training objective (``params.yaml: loss``); see ``cxrgaze.losses``.

    Total loss ``gamma * L_cls + (1 - gamma) * heatmap_loss``; set 3's heatmap loss is
    ``alpha * L_s(M, G) + (1 - alpha) * L_H(H, G)``. The baseline's loss is ``L_cls``; rrr's
    ``L_cls + rrr_weight * R``.
    """

    gamma: float = 0.41731
    """Weight of the classification loss (reference U-Net: 0.41731)."""
    alpha: float = 0.5
    """Set 3: weight of the mask-vs-gaze term against the generator-vs-gaze term."""
    cls_loss: str = "bce"
    """``bce``: BCE-with-logits on the one-hot label (reference); ``ce``: cross-entropy."""
    map_loss: str = "bce"
    """Heatmap loss ``L_s``: ``bce`` (reference), ``kl`` (maps normalised to
    distributions, KL(target || prediction)) or ``mse`` (on [0, 1] maps)."""
    detach_generator_target: bool = True
    """Set 2: treat the generator heatmap as a fixed target for the decoder (no second-order
    gradient into the generator)."""
    eps: float = 1e-6
    """Clamp of [0, 1] heatmaps before a BCE (the max pixel of a normalised map is exactly 1)."""
    mass_weight: float = 0.0
    """Sets 1 and 3: weight of the generator map's share of mass outside the gaze, added to
    the generator-vs-gaze loss (0: the paper's loss; see ``cxrgaze.losses``)."""
    outside_weight: float = 0.0
    """Sets 1 and 3: weight of the outside-gaze penalty ``mean ((1 - G) H)^2`` on the generator map."""
    rrr_weight: float = 1.0e-4
    """``rrr-*``: weight ``l`` of Ross et al.'s penalty on the attribution outside the gaze.
    It is on the raw attributions' scale, which depends on the rule and the network: the
    default makes the penalty about as large as ``L_cls`` at initialisation for the plain
    gradient on the synthetic default (Ross et al.'s rule of thumb); guided backprop's
    penalty is ~50x larger there (``params.yaml`` sets ``rrr-gbp``'s own). Tune it on a log
    scale."""

    def __post_init__(self) -> None:
        for name in ("gamma", "alpha"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"loss.{name} must be in [0, 1], got {value}")
        for name in ("mass_weight", "outside_weight", "rrr_weight"):
            value = getattr(self, name)
            if not _non_negative(value):
                raise ConfigError(f"loss.{name} must be a non-negative number, got {value!r}")
        if self.cls_loss not in ("bce", "ce"):
            raise ConfigError(f"loss.cls_loss must be 'bce' or 'ce', got {self.cls_loss!r}")
        if self.map_loss not in ("bce", "kl", "mse"):
            raise ConfigError(f"loss.map_loss must be 'bce', 'kl' or 'mse', got {self.map_loss!r}")
        if not 0.0 < self.eps < 0.5:
            raise ConfigError(f"loss.eps must be in (0, 0.5), got {self.eps}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation of one run (``params.yaml: train``, per-variant ``variants.<name>``)."""

    variant: str = "unet"
    epochs: int = 35
    """Reference U-Net: 35 (baseline: 20)."""
    batch_size: int = 32
    lr: float = 0.0090552
    """Reference U-Net: 0.0090552 (baseline: 0.006486)."""
    optimizer: str = "adam"
    """``adam`` (reference) or ``adamw``."""
    weight_decay: float = 0.0
    scheduler: str = "none"
    """``none`` or ``cyclic`` (the reference's triangular cyclic LR, stepped per epoch)."""
    cyclic_min_factor: float = 0.1
    """``cyclic``: the lowest LR as a fraction of ``lr``."""
    cyclic_half_period: int = 4
    """``cyclic``: epochs from the lowest to the highest LR."""
    clip_value: float = 0.1
    """Gradient value clipping (reference: 0.1); 0 disables it."""
    seed: int = 0
    device: str = "auto"
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:1``..."""
    amp: str = "fp32"
    """``fp32`` (no autocast) or ``bf16`` (bfloat16 autocast; meant for CUDA). Neither
    spelling changes meaning when ``dvc exp run -S`` rewrites ``params.yaml`` without
    quotes. The legacy ``off`` (and ``false``, which YAML reads from an unquoted ``off``)
    still means ``fp32``."""
    augment: bool = False
    """Small random affine on image and gaze together (off, as the reference)."""
    eval_batch_size: int = 64
    selection_gaze_weight: float = 0.0
    """Checkpoint selection (and the tuning objective): the epoch kept maximises
    ``val_selection = val_auc_macro - selection_gaze_weight * val_outside_mass``, the
    validation AUC minus the share of the generator map's mass outside the gaze on
    validation images (the variant's generator, guided backprop for baseline and unet).
    0 (the default) selects by validation AUC alone. A positive weight rewards looking
    where the radiologist looked when the validation set, like the synthetic one, carries
    the same shortcut as training."""

    def __post_init__(self) -> None:
        try:
            parse_variant(self.variant)
        except ValueError as exc:
            raise ConfigError(f"train.variant: {exc}") from None
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"train.epochs and train.batch_size must be positive, got {self.epochs}, {self.batch_size}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if self.optimizer not in ("adam", "adamw"):
            raise ConfigError(f"train.optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        if self.scheduler not in ("none", "cyclic"):
            raise ConfigError(f"train.scheduler must be 'none' or 'cyclic', got {self.scheduler!r}")
        if self.amp is False or self.amp == "off":  # legacy spellings of fp32
            object.__setattr__(self, "amp", "fp32")
        if not _non_negative(self.selection_gaze_weight):
            raise ConfigError(f"train.selection_gaze_weight must be a non-negative number, got {self.selection_gaze_weight!r}")
        if self.amp not in ("fp32", "bf16"):
            raise ConfigError(f"train.amp must be 'fp32' or 'bf16', got {self.amp!r}")
