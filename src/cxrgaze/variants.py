"""The one home of the experiment variants: their names and what each one is.

A variant name is ``<objective>`` or ``<objective>-<rule>``:

================ ============================================================ =========
objective        training loss (``cxrgaze.losses``)                          decoder
================ ============================================================ =========
``baseline``     ``L_cls``                                                    no
``unet``         ``g L_cls + (1-g) L_s(M, G)``                                yes
``set1-R``       ``g L_cls + (1-g) L_H(H, G)``                                yes
``set2-R``       ``g L_cls + (1-g) L_s(M, H)``                                yes
``set3-R``       ``g L_cls + (1-g) (a L_s(M, G) + (1-a) L_H(H, G))``          yes
``rrr-R``        ``L_cls + l sum_pixels ((1 - G) A)^2`` (Ross et al. 2017)    no
================ ============================================================ =========

``R`` is a generator rule (``grad``, ``gbp``, ``deconv``; :mod:`cxrgaze.explain.rules`).
Every other module asks a :class:`Variant` what it needs (does the model have a decoder,
which loss weights may be tuned, which generator explains it) instead of comparing names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

GENERATOR_RULES: tuple[str, ...] = ("grad", "gbp", "deconv")
"""The generator rules a variant name may carry: the backward rules of
:mod:`cxrgaze.explain.rules` (its ``Rule`` type is checked against this tuple on import)."""

VARIANTS: tuple[str, ...] = (
    "baseline",
    "unet",
    "set1-gbp",
    "set1-deconv",
    "set2-gbp",
    "set2-deconv",
    "set3-gbp",
    "set3-deconv",
    "set3-grad",
    "rrr-grad",
    "rrr-gbp",
)
"""The variants the command line offers: the paper's table, a plain-gradient set-3 row and
"right for the right reasons" with the plain gradient and with guided backpropagation.
:func:`parse_variant` also accepts any other objective-rule pair."""

OBJECTIVES: tuple[str, ...] = ("baseline", "unet", "set1", "set2", "set3", "rrr")
_WITH_RULE = ("set1", "set2", "set3", "rrr")
MAP_TERMS: tuple[str, ...] = ("mass_weight", "outside_weight")
"""The optional terms of the generator-vs-gaze loss ``L_H`` (``cxrgaze.losses.generator_gaze_loss``)."""


class TermWeights(NamedTuple):
    """The weight of each term of a variant's loss (0: the term is not computed)."""

    cls: float
    mask_gaze: float
    gen_gaze: float
    mask_gen: float
    rrr: float


@dataclass(frozen=True)
class Variant:
    """A parsed variant name: its objective and generator rule (``None`` for ``baseline``
    and ``unet``)."""

    name: str
    objective: str
    rule: str | None

    @property
    def description(self) -> str:
        """What the variant trains, in words (run descriptions, the registry)."""
        rule = {"grad": "plain-gradient", "gbp": "guided-backprop", "deconv": "DeconvNet"}.get(self.rule or "", "")
        return {
            "baseline": "encoder and classification head (no decoder); classification loss only",
            "unet": "U-Net whose decoder mask is supervised by the gaze",
            "set1": f"U-Net whose {rule} heatmap is supervised by the gaze (set 1)",
            "set2": f"U-Net whose decoder mask is supervised by its {rule} heatmap (set 2)",
            "set3": f"U-Net whose decoder mask and {rule} heatmap are both supervised by the gaze (set 3, mix alpha)",
            "rrr": f"classifier whose {rule} attributions outside the gaze are penalised (right for the right reasons)",
        }[self.objective]

    @property
    def has_decoder(self) -> bool:
        """Whether the model is a U-Net; ``baseline`` and ``rrr`` are encoder + head."""
        return self.objective not in ("baseline", "rrr")

    @property
    def loss_weights(self) -> tuple[str, ...]:
        """The ``loss`` settings this variant's objective uses, which tuning may search:
        none for ``baseline``; ``gamma`` for ``unet`` and set 2; ``gamma`` and the generator
        terms for set 1; ``alpha`` as well for set 3; ``rrr_weight`` for ``rrr``."""
        return {
            "baseline": (),
            "unet": ("gamma",),
            "set1": ("gamma", *MAP_TERMS),
            "set2": ("gamma",),
            "set3": ("alpha", "gamma", *MAP_TERMS),
            "rrr": ("rrr_weight",),
        }[self.objective]

    def term_weights(self, gamma: float, alpha: float, rrr_weight: float) -> TermWeights:
        """The weights of this variant's loss terms (the table above) given ``loss.gamma``,
        ``loss.alpha`` and ``loss.rrr_weight``; a weight the objective does not have is 0
        (``cls`` is 1 where there is no ``gamma``)."""
        g = gamma if "gamma" in self.loss_weights else 1.0
        rest = 1.0 - g
        return TermWeights(
            cls=g,
            mask_gaze=rest * {"unet": 1.0, "set3": alpha}.get(self.objective, 0.0),
            gen_gaze=rest * {"set1": 1.0, "set3": 1.0 - alpha}.get(self.objective, 0.0),
            mask_gen=rest if self.objective == "set2" else 0.0,
            rrr=rrr_weight if "rrr_weight" in self.loss_weights else 0.0,
        )

    @property
    def trains_mask(self) -> bool:
        """Whether a loss term trains the decoder mask (``unet``, sets 2 and 3); set 1's
        decoder is never trained, so its mask means nothing."""
        return self.objective in ("unet", "set2", "set3")

    @property
    def trains_generator(self) -> bool:
        """Whether a loss term acts on the generator's map or attribution (sets 1 and 3,
        ``rrr``). For ``baseline`` and ``unet`` the generator map is a diagnostic only."""
        return self.objective in ("set1", "set3", "rrr")

    @property
    def generator(self) -> str:
        """The rule of the generator that explains this variant: its own, or guided
        backpropagation for ``baseline`` and ``unet`` (a common diagnostic)."""
        return self.rule or "gbp"


def parse_variant(name: str) -> Variant:
    """``"set3-gbp"`` -> ``Variant("set3-gbp", "set3", "gbp")``; a clear error otherwise."""
    if name in ("baseline", "unet"):
        return Variant(name, name, None)
    objective, _, rule = str(name).partition("-")
    if objective in _WITH_RULE and rule in GENERATOR_RULES:
        return Variant(name, objective, rule)
    raise ValueError(
        f"unknown variant {name!r}; expected one of {', '.join(VARIANTS)} "
        f"(or {'/'.join(_WITH_RULE)} with any of {', '.join(GENERATOR_RULES)})"
    )
