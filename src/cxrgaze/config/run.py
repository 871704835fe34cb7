"""A training run's configuration: ``params.yaml: model``, ``loss``, ``train`` and the
per-variant overrides ``variants.<name>``, resolved into one :class:`RunConfig`
(:func:`resolve_run_config`) per variant and training seed (:func:`run_seeds`).

Checkpoints and MLflow runs carry :meth:`RunConfig.as_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cxrgaze.config.core import ConfigError, as_mapping, check_mapping, check_value, from_mapping, non_negative, to_dict
from cxrgaze.variants import parse_variant


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
            if not non_negative(value):
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
    micro_batches: int = 1
    """Micro-batches per process (``cxrgaze train --micro-batches N``): each global batch is
    cut into ``world_size * micro_batches`` contiguous shards and a process runs its
    shards in turn, accumulating their gradients. One process with ``N`` computes what
    ``N`` ``torchrun`` ranks do (batch-norm statistics and dropout masks per shard), and is
    gradient accumulation when a global batch does not fit in memory. 1: one forward and
    backward of the whole batch per process."""
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
    amp: str | bool = "fp32"
    """``fp32`` (no autocast) or ``bf16`` (bfloat16 autocast; meant for CUDA). Neither
    spelling changes meaning when ``dvc exp run -S`` rewrites ``params.yaml`` without
    quotes. The legacy ``off`` (and ``false``, which YAML reads from an unquoted ``off``:
    hence the ``bool`` in the annotation) still means ``fp32``; the resolved value is
    always ``fp32`` or ``bf16``."""
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
        if isinstance(self.micro_batches, bool) or not isinstance(self.micro_batches, int) or self.micro_batches < 1:
            raise ConfigError(f"train.micro_batches must be a positive integer, got {self.micro_batches!r}")
        if self.optimizer not in ("adam", "adamw"):
            raise ConfigError(f"train.optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        if self.scheduler not in ("none", "cyclic"):
            raise ConfigError(f"train.scheduler must be 'none' or 'cyclic', got {self.scheduler!r}")
        if self.amp is False or self.amp == "off":  # legacy spellings of fp32
            object.__setattr__(self, "amp", "fp32")
        if not non_negative(self.selection_gaze_weight):
            raise ConfigError(f"train.selection_gaze_weight must be a non-negative number, got {self.selection_gaze_weight!r}")
        if self.amp not in ("fp32", "bf16"):
            raise ConfigError(f"train.amp must be 'fp32' or 'bf16', got {self.amp!r}")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run (stored in checkpoints and MLflow params)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def as_dict(self) -> dict[str, Any]:
        return {"model": to_dict(self.model), "loss": to_dict(self.loss), "train": to_dict(self.train)}


def run_seeds(params: dict[str, Any], where: str = "params.yaml") -> tuple[int, ...]:
    """The training seeds of a params mapping: ``train.seeds`` (a list: every variant is
    trained once per seed), or ``(train.seed,)`` when there is no list."""
    train_section = as_mapping(params.get("train"), f"{where}: train")
    seeds = train_section.get("seeds")
    if seeds is None:
        return (check_value(train_section.get("seed", TrainConfig.seed), int, f"{where}: train.seed"),)
    if (not isinstance(seeds, (list, tuple)) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
            or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"{where}: train.seeds must be a non-empty list of distinct non-negative integers, got {seeds!r}")
    if "seed" in train_section:
        raise ConfigError(f"{where}: train has both seed and seeds; keep one")
    return tuple(seeds)


def resolve_run_config(params: dict[str, Any], variant: str, where: str = "params.yaml",
                       seed: int | None = None) -> RunConfig:
    """The RunConfig of ``variant`` (for one training ``seed``) from a params mapping.

    ``model``, ``loss`` and ``train`` give the common settings; ``variants.<variant>`` may
    override any of them with its own ``model:``/``loss:``/``train:`` mappings (the
    reference tuned the baseline and the U-Net separately). ``seed`` defaults to the first
    of :func:`run_seeds`. Each section is checked alone first, so that an error names the
    key where the bad value is written: ``train.lr`` or ``variants.<variant>.train.lr``.
    """
    try:
        parse_variant(variant)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    overrides = as_mapping(as_mapping(params.get("variants"), f"{where}: variants").get(variant),
                           f"{where}: variants.{variant}")
    unknown = sorted(set(overrides) - {"model", "loss", "train"})
    if unknown:
        raise ConfigError(f"{where}: variants.{variant}: unknown section(s) {', '.join(unknown)}")
    configs = {}
    for name, cls in (("model", ModelConfig), ("loss", LossConfig), ("train", TrainConfig)):
        common = {k: v for k, v in as_mapping(params.get(name), f"{where}: {name}").items() if k != "seeds"}
        from_mapping(cls, common, where=f"{where}: {name}")
        own = check_mapping(cls, overrides.get(name), where=f"{where}: variants.{variant}.{name}")
        merged = {**common, **own}
        if name == "train":
            merged.update(variant=variant, seed=run_seeds(params, where)[0] if seed is None else seed)
        configs[name] = from_mapping(cls, merged, where=f"{where}: variants.{variant}.{name}" if own else
                                     f"{where}: {name}")
    return RunConfig(**configs)
