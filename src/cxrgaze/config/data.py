"""The data sections: ``params.yaml: data`` (what ``prepare`` writes) and ``split``."""

from __future__ import annotations

from dataclasses import dataclass

from cxrgaze.config.core import ConfigError


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
