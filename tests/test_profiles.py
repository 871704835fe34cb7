"""The shipped parameter files resolve into valid configs for every variant."""

from pathlib import Path

import pytest

from cxrgaze.config import VARIANTS, DataConfig, SplitConfig, from_mapping, load_params
from cxrgaze.train import resolve_run_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", ["params.yaml", "profiles/paper.yaml"])
def test_params_files_resolve(path):
    params = load_params(ROOT / path)
    from_mapping(DataConfig, params["data"])
    from_mapping(SplitConfig, params["split"])
    assert set(params["variants"]) == set(VARIANTS)
    for variant in VARIANTS:
        config = resolve_run_config(params, variant, where=path)
        assert config.train.variant == variant
    from cxrgaze.evaluate import EvalConfig
    from cxrgaze.registry import RegisterConfig
    from cxrgaze.tune import tune_config

    from_mapping(EvalConfig, params["evaluate"])
    from_mapping(RegisterConfig, params["register"])
    assert set(tune_config(params, where=path).variants) <= set(VARIANTS)


def test_paper_profile_has_the_reference_settings():
    params = load_params(ROOT / "profiles/paper.yaml")
    unet = resolve_run_config(params, "unet")
    base = resolve_run_config(params, "baseline")
    assert (unet.train.lr, unet.train.epochs, unet.loss.gamma, unet.model.dropout) == (0.0090552, 35, 0.41731, 0.5)
    assert (base.train.lr, base.train.epochs, base.loss.gamma, base.model.dropout) == (0.006486, 20, 1.0, 0.0)
    assert params["data"]["image_size"] == 224 and params["model"]["encoder"] == "efficientnet-b0"
