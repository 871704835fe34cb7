"""Model factory: shapes, the baseline without decoder, weights handling, input contract."""

from __future__ import annotations

import pytest
import torch

from cxrgaze.config import ConfigError, ModelConfig, from_mapping
from cxrgaze.models import IMAGENET_MEAN, IMAGENET_STD, ModelError, build_model, class_logits, split_outputs

SMALL = ModelConfig(encoder="resnet18", dropout=0.0)





@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_model(SMALL).eval()


def test_unet_returns_mask_and_class_logits(unet):
    """A mask per pixel and three class logits per image, each image's own: in eval mode an
    image's outputs do not depend on the rest of the batch (prediction one by one equals
    prediction in batches), and other images give other outputs."""
    torch.manual_seed(3)
    x = torch.rand(2, 1, 64, 64)
    mask_logits, logits = unet(x)
    assert mask_logits.shape == (2, 1, 64, 64)
    assert logits.shape == (2, 3)
    assert unet.has_decoder
    alone_mask, alone_logits = unet(x[1:])
    torch.testing.assert_close(alone_logits, logits[1:])
    torch.testing.assert_close(alone_mask, mask_logits[1:])
    assert not torch.allclose(logits[0], logits[1], atol=1e-4)
    assert not torch.allclose(mask_logits[0], mask_logits[1], atol=1e-4)
    flipped_mask, _ = unet(x.flip(-1))  # the mask follows the image
    assert not torch.allclose(flipped_mask, mask_logits, atol=1e-4)


def test_default_config_is_the_reference_unet_without_downloads(monkeypatch):
    import segmentation_models_pytorch.encoders as encoders

    def no_network(*args, **kwargs):
        raise AssertionError("build_model must not download anything by default")

    monkeypatch.setattr(encoders, "hf_hub_download", no_network)
    config = ModelConfig()
    assert config.encoder == "efficientnet-b0" and config.encoder_weights is None
    model = build_model(config).eval()
    mask_logits, logits = model(torch.rand(1, 1, 64, 64))
    assert mask_logits.shape == (1, 1, 64, 64) and logits.shape == (1, 3)


def test_baseline_has_no_decoder_and_returns_class_logits():
    model = build_model(SMALL, variant="baseline").eval()
    assert not model.has_decoder
    assert model.decoder is None and model.segmentation_head is None
    assert not any(k.startswith(("decoder.", "segmentation_head.")) for k in model.state_dict())
    logits = model(torch.rand(2, 1, 64, 64))
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 3)
    assert split_outputs(logits)[0] is None


def test_baseline_and_unet_share_encoder_keys(unet):
    baseline = build_model(SMALL, variant="baseline")
    shared = {k for k in baseline.state_dict()}
    assert shared <= set(unet.state_dict())
    baseline.load_state_dict(unet.state_dict(), strict=False)  # encoder + head transfer


def test_classify_skips_the_decoder_and_matches_forward(unet):
    x = torch.rand(2, 1, 64, 64)
    calls = []
    handle = unet.decoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        logits = class_logits(unet, x)
    finally:
        handle.remove()
    assert calls == []
    torch.testing.assert_close(logits, unet(x)[1])


def test_models_return_logits_and_normalise_inside(unet):
    x = torch.rand(1, 1, 32, 32)
    prepared = unet.preprocess(x)  # (1, 3, 32, 32)
    for c in range(3):
        torch.testing.assert_close(prepared[:, c], (x[:, 0] - IMAGENET_MEAN[c]) / IMAGENET_STD[c])
    assert "mean" not in unet.state_dict() and "std" not in unet.state_dict()
    # Raw scores, probabilities live elsewhere: the class logits are the head's last linear
    # layer's output as it is (no sigmoid or softmax after it), one row of 3 per image.
    linear = [m for m in unet.classification_head.modules() if isinstance(m, torch.nn.Linear)][-1]
    seen = []
    handle = linear.register_forward_hook(lambda module, inputs, output: seen.append(output.detach()))
    try:
        _, black = unet(torch.zeros(4, 1, 64, 64))
        _, images = unet(torch.rand(4, 1, 64, 64))
    finally:
        handle.remove()
    assert black.shape == images.shape == (4, 3) and images.dtype == torch.float32
    torch.testing.assert_close(black, seen[0], rtol=0, atol=0)
    torch.testing.assert_close(images, seen[1], rtol=0, atol=0)
    assert not torch.allclose(black, images, atol=1e-4)  # the logits follow the input


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 64, 64), (2, 1, 64)])
def test_rejects_inputs_that_are_not_grey_batches(unet, shape):
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        unet(torch.rand(*shape))


def test_unet_input_size_must_fit_the_encoder_stride(unet):
    with pytest.raises(ValueError, match="multiples of 32"):
        unet(torch.rand(1, 1, 50, 64))


def test_unreachable_named_weights_name_the_cache_and_point_to_local_files(monkeypatch, tmp_path):
    """The paper profile's ``imagenet`` weights, offline and not cached: one line naming the
    Hub repository, the cache folder it was looked for in, and the local-file alternative."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the real client, told it is offline
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelError) as caught:
        build_model(ModelConfig(encoder="efficientnet-b0", encoder_weights="imagenet"))
    message = str(caught.value)
    assert "\n" not in message
    assert "smp-hub/efficientnet-b0.imagenet" in message
    assert str(tmp_path / "hub" / "models--smp-hub--efficientnet-b0.imagenet") in message
    assert "path of a local weights file" in message
    with pytest.raises(ModelError, match="Wrong pretrained weights"):
        build_model(ModelConfig(encoder="resnet18", encoder_weights="noisy-student"))


def test_bad_encoder_name_is_a_clear_error():
    with pytest.raises(ModelError, match=r"unknown encoder 'efficientnet-bzero'.*efficientnet-b0"):
        build_model(ModelConfig(encoder="efficientnet-bzero"))


def test_local_encoder_weights_file_loads(tmp_path):
    torch.manual_seed(1)
    source = build_model(SMALL, variant="baseline")
    path = tmp_path / "encoder.pt"
    torch.save(source.encoder.state_dict(), path)
    model = build_model(ModelConfig(encoder="resnet18", encoder_weights=str(path)))
    for key, value in source.encoder.state_dict().items():
        torch.testing.assert_close(model.encoder.state_dict()[key], value)


def test_full_model_checkpoint_supplies_encoder_weights(tmp_path):
    torch.manual_seed(2)
    source = build_model(SMALL)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)
    model = build_model(ModelConfig(encoder="resnet18", encoder_weights=str(path)), variant="baseline")
    key = "conv1.weight"
    torch.testing.assert_close(model.encoder.state_dict()[key], source.encoder.state_dict()[key])


def test_safetensors_weights_load(tmp_path):
    from safetensors.torch import save_file

    source = build_model(SMALL, variant="baseline")
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in source.encoder.state_dict().items()}, str(path))
    model = build_model(ModelConfig(encoder="resnet18", encoder_weights=str(path)))
    torch.testing.assert_close(model.encoder.conv1.weight, source.encoder.conv1.weight)


def test_weights_that_do_not_fit_are_a_clear_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(build_model(SMALL, variant="baseline").encoder.state_dict(), path)
    with pytest.raises(ModelError, match="do not fit"):
        build_model(ModelConfig(encoder="resnet34", encoder_weights=str(path)))
    with pytest.raises(ModelError, match="does not exist"):
        build_model(ModelConfig(encoder="resnet18", encoder_weights=str(tmp_path / "missing.pt")))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read"):
        build_model(ModelConfig(encoder="resnet18", encoder_weights=str(tmp_path / "junk.pt")))


def test_model_config_from_params_mapping():
    config = from_mapping(ModelConfig, {"encoder": "resnet18", "decoder_channels": [64, 32, 16, 8, 4]})
    assert config.decoder_channels == (64, 32, 16, 8, 4)
    model = build_model(config).eval()
    assert model(torch.rand(1, 1, 32, 32))[0].shape == (1, 1, 32, 32)
    with pytest.raises(ConfigError, match="pooling"):
        ModelConfig(pooling="median")
    with pytest.raises(ConfigError, match="unknown key"):
        from_mapping(ModelConfig, {"encoder_name": "resnet18"})


def test_timm_efficientnet_and_timm_universal_encoders_build():
    for name in ("timm-efficientnet-b0", "tu-tinynet_e"):
        model = build_model(ModelConfig(encoder=name)).eval()
        mask_logits, logits = model(torch.rand(1, 1, 64, 64))
        assert mask_logits.shape == (1, 1, 64, 64) and logits.shape == (1, 3)
