"""The shipped parameter files resolve into valid configs for every variant."""

from pathlib import Path

import pytest

from cxrgaze.config import VARIANTS, DataConfig, SplitConfig, from_mapping, load_params, overlay, resolve_run_config

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ["profiles/paper.yaml", "profiles/study.yaml"]


def _resolved(path: str) -> dict:
    """params.yaml, or params.yaml with the profile overlay ``path`` applied (as `cxrgaze profile` does)."""
    base = load_params(ROOT / "params.yaml")
    return base if path == "params.yaml" else overlay(base, load_params(ROOT / path))


@pytest.mark.parametrize("path", ["params.yaml", *PROFILES])
def test_params_files_resolve(path):
    params = _resolved(path)
    from_mapping(DataConfig, params["data"])
    from_mapping(SplitConfig, params["split"])
    assert set(params["variants"]) == set(VARIANTS)
    for variant in VARIANTS:
        config = resolve_run_config(params, variant, where=path)
        assert config.train.variant == variant
    from cxrgaze.config import EvalConfig, RegisterConfig, tune_config

    from_mapping(EvalConfig, params["evaluate"])
    from_mapping(RegisterConfig, params["register"])
    assert set(tune_config(params, where=path).variants) <= set(VARIANTS)


@pytest.mark.parametrize("path", PROFILES)
def test_a_profile_states_only_what_differs_from_params(path):
    """A profile is an overlay: every value it names differs from params.yaml's (a copy of
    an unchanged value could silently drift when params.yaml changes)."""
    def same(base, profile, where=""):
        for key, value in profile.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                yield from same(base[key], value, f"{where}{key}.")
            elif key in base and base[key] == value:
                yield f"{where}{key}"

    assert list(same(load_params(ROOT / "params.yaml"), load_params(ROOT / path))) == []


def test_paper_profile_has_the_reference_settings():
    params = _resolved("profiles/paper.yaml")
    unet = resolve_run_config(params, "unet")
    base = resolve_run_config(params, "baseline")
    assert (unet.train.lr, unet.train.epochs, unet.loss.gamma, unet.model.dropout) == (0.0090552, 35, 0.41731, 0.5)
    assert (base.train.lr, base.train.epochs, base.loss.gamma, base.model.dropout) == (0.006486, 20, 1.0, 0.0)
    assert params["data"]["image_size"] == 224 and params["model"]["encoder"] == "efficientnet-b0"


def test_study_overlay_states_only_differences_and_resolves(tmp_path):
    """`cxrgaze profile` merges an overlay into params.yaml: what the overlay names changes,
    everything else stays, and the result is a valid, budget-matched, three-seed setup."""
    from cxrgaze.cli import main
    from cxrgaze.config import run_seeds, tune_config, variant_space

    out = tmp_path / "params.yaml"
    assert main(["profile", str(ROOT / "profiles/study.yaml"), "--base", str(ROOT / "params.yaml"),
                 "--out", str(out)]) == 0
    base, study = load_params(ROOT / "params.yaml"), load_params(out)
    overlay = load_params(ROOT / "profiles/study.yaml")
    for section in set(base) - set(overlay):
        assert study[section] == base[section], section
    assert study["train"] == {**base["train"], "seeds": [0, 1, 2], "selection_gaze_weight": 1.0}
    assert run_seeds(study) == (0, 1, 2)
    assert [resolve_run_config(study, "unet", seed=s).train.seed for s in run_seeds(study)] == [0, 1, 2]
    cfg = tune_config(study)
    # The same budget for every variant with loss weights, each over the weights it has.
    assert set(cfg.variants) == set(VARIANTS) - {"baseline"}
    assert cfg.n_trials == 6
    assert {v: sorted(variant_space(cfg.space, v)) for v in ("unet", "set1-gbp", "set2-deconv", "set3-gbp", "rrr-gbp")} == {
        "unet": ["gamma"], "set1-gbp": ["gamma", "mass_weight", "outside_weight"], "set2-deconv": ["gamma"],
        "set3-gbp": ["alpha", "gamma", "mass_weight", "outside_weight"], "rrr-gbp": ["rrr_weight"]}
    assert resolve_run_config(study, "rrr-gbp").train.selection_gaze_weight == 1.0


def test_seeds_are_validated():
    from cxrgaze.config import ConfigError, run_seeds

    assert run_seeds({"train": {"seed": 3}}) == (3,)
    for bad in ([], [0, 0], [-1], ["a"], 2):
        with pytest.raises(ConfigError, match="train.seeds"):
            run_seeds({"train": {"seeds": bad}})
    with pytest.raises(ConfigError, match="both seed and seeds"):
        run_seeds({"train": {"seeds": [1], "seed": 0}})
