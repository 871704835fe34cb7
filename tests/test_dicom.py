"""Code tests for DICOM decoding (polarity, LUTs, codecs, damaged files) and the resize map."""

import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_windowing
from pydicom.uid import JPEG2000Lossless, MPEG2MPML, RLELossless

from cxrgaze.data.dicom import DicomError, ResizeMap, read_dicom

from data_factory import dicom_dataset, phantom, write_dicom


@pytest.fixture(scope="module")
def pixels():
    return phantom(48, 40, seed=3)  # (H, W) 12-bit


def test_output_is_float32_in_unit_range_with_info(tmp_path, pixels):
    image, info = read_dicom(write_dicom(tmp_path / "a.dcm", pixels))
    assert image.dtype == np.float32 and image.shape == (48, 40)
    assert image.min() == 0.0 and image.max() == 1.0
    assert (info.photometric, info.original_height, info.original_width) == ("MONOCHROME2", 48, 40)
    assert info.bits_stored == 12
    assert info.transfer_syntax == "1.2.840.10008.1.2.1" and info.voi == "minmax"


def test_monochrome1_is_inverted_to_monochrome2_polarity(tmp_path, pixels):
    mono2, _ = read_dicom(write_dicom(tmp_path / "m2.dcm", pixels, photometric="MONOCHROME2"))
    mono1, info = read_dicom(write_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1"))
    assert info.photometric == "MONOCHROME1"
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)


def test_rescale_slope_and_intercept_are_applied_before_the_window(tmp_path, pixels):
    path = write_dicom(tmp_path / "r.dcm", pixels, RescaleSlope=2, RescaleIntercept=-4000,
                       WindowCenter=0, WindowWidth=3000, VOILUTFunction="LINEAR_EXACT")
    image, info = read_dicom(path)
    values = pixels.astype(np.float64) * 2 - 4000
    np.testing.assert_allclose(image, np.clip(values / 3000 + 0.5, 0, 1), atol=1e-6)
    assert info.voi == "window"


def test_negative_rescale_slope_flips_an_unwindowed_image(tmp_path, pixels):
    plain, _ = read_dicom(write_dicom(tmp_path / "p.dcm", pixels))
    flipped, _ = read_dicom(write_dicom(tmp_path / "f.dcm", pixels, RescaleSlope=-1, RescaleIntercept=0))
    np.testing.assert_allclose(flipped, 1.0 - plain, atol=1e-6)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_voi_window_matches_pydicom_scaled_to_unit_range(tmp_path, pixels, function):
    path = write_dicom(tmp_path / "w.dcm", pixels, WindowCenter=[1500, 900], WindowWidth=[1200, 400],
                       VOILUTFunction=function)
    image, info = read_dicom(path)
    ds = pydicom.dcmread(path)
    expected = apply_windowing(ds.pixel_array, ds) / 4095.0  # pydicom maps to [0, 2**12 - 1]
    assert info.voi == "window"
    np.testing.assert_allclose(image, expected, atol=1e-5)
    if function != "SIGMOID":  # the linear windows clip some pixels, not all
        assert 0 < (image == 0).sum() + (image == 1).sum() < image.size


@pytest.mark.parametrize("vr", ["US", "OW"])
def test_voi_lut_sequence_is_preferred_and_scaled_by_its_range(tmp_path, pixels, vr):
    ds = dicom_dataset(pixels, WindowCenter=2000, WindowWidth=100)
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 8]
    lut = (np.sqrt(np.arange(4096) / 4095) * 200 + 20).astype(np.uint16)  # a gamma-like 8-bit table
    item.add_new(0x00283006, vr, lut.tolist() if vr == "US" else lut.astype("<u2").tobytes())  # LUT Data
    ds.VOILUTSequence = [item]
    path = tmp_path / f"lut-{vr}.dcm"
    ds.save_as(path, enforce_file_format=True)
    image, info = read_dicom(path)
    assert info.voi == "lut"
    np.testing.assert_allclose(image, (lut[pixels] - 20) / 200.0, atol=1e-6)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_lossless_compressed_decodes_equal_to_the_original(tmp_path, pixels, syntax):
    plain, _ = read_dicom(write_dicom(tmp_path / "plain.dcm", pixels))
    packed, info = read_dicom(write_dicom(tmp_path / "packed.dcm", pixels, compress=syntax))
    assert info.transfer_syntax == syntax
    np.testing.assert_array_equal(packed, plain)


def test_pydicom_shipped_files_in_four_transfer_syntaxes_agree():
    names = ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"]
    images = [read_dicom(get_testdata_file(n), name=n) for n in names]
    assert len({info.transfer_syntax for _, info in images}) == 4
    for image, info in images[1:]:
        np.testing.assert_array_equal(image, images[0][0])
    assert images[0][1].voi == "window"


def test_pydicom_shipped_signed_ct_and_jpeg2000():
    ct, info = read_dicom(get_testdata_file("CT_small.dcm"))
    assert ct.shape == (128, 128) and ct.min() == 0 and ct.max() == 1 and info.bits_stored == 16
    j2k, info = read_dicom(get_testdata_file("JPEG2000.dcm"))
    assert info.transfer_syntax == "1.2.840.10008.1.2.4.91" and 0 <= j2k.min() < j2k.max() <= 1


def test_colour_image_becomes_grey():
    image, info = read_dicom(get_testdata_file("examples_rgb_color.dcm"))
    assert image.ndim == 2 and info.photometric in ("RGB", "YBR_FULL", "YBR_FULL_422")
    assert 0 <= image.min() < image.max() <= 1


def test_reads_from_bytes(tmp_path, pixels):
    path = write_dicom(tmp_path / "b.dcm", pixels)
    from_bytes, _ = read_dicom(path.read_bytes(), name="upload")
    np.testing.assert_array_equal(from_bytes, read_dicom(path)[0])


def _error(source, name="x.dcm") -> DicomError:
    with pytest.raises(DicomError) as caught:
        read_dicom(source, name=name)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{name}: ")
    return caught.value


def test_damaged_inputs_give_one_line_reasons(tmp_path, pixels):
    assert _error(tmp_path / "nope.dcm").kind == "missing_file"
    (tmp_path / "text.dcm").write_text("not a dicom")
    assert "not a DICOM file" in str(_error(tmp_path / "text.dcm"))
    data = write_dicom(tmp_path / "t.dcm", pixels).read_bytes()
    error = _error(data[: len(data) - 100])
    assert error.kind == "truncated" and "pixel data shorter than expected" in str(error)
    assert _error(data[:400]).kind == "truncated"  # cut inside the header
    packed = write_dicom(tmp_path / "j.dcm", pixels, compress=JPEG2000Lossless).read_bytes()
    assert _error(packed[: len(packed) // 2]).kind == "truncated"


def test_no_pixel_data_and_no_decoder(tmp_path, pixels):
    assert _error(get_testdata_file("rtplan.dcm")).kind == "no_pixel_data"
    ds = dicom_dataset(pixels)
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    ds["PixelData"].VR = "OB"
    path = tmp_path / "mpeg.dcm"
    ds.save_as(path, enforce_file_format=True)
    error = _error(path)
    assert error.kind == "no_decoder" and "no decoder for transfer syntax MPEG2" in str(error)


def test_pydicom_shipped_damaged_files():
    assert _error(get_testdata_file("MR_truncated.dcm")).kind == "truncated"
    assert _error(get_testdata_file("no_meta.dcm")).kind == "not_dicom"


@pytest.mark.parametrize("mode", ["stretch", "pad"])
@pytest.mark.parametrize("shape", [(300, 200), (150, 420), (64, 64)])
def test_points_follow_the_image_through_the_resize(mode, shape):
    resize_map = ResizeMap.create(shape, 48, mode)
    image = np.zeros(shape, np.float32)
    y0, x0 = shape[0] // 3, shape[1] // 2
    image[y0 - 8:y0 + 9, x0 - 8:x0 + 9] = 1.0  # a blob centred on (x0, y0)
    out = resize_map.resize(image)
    assert out.shape == (48, 48) and out.dtype == np.float32
    yy, xx = np.mgrid[0:48, 0:48]
    centroid = ((xx * out).sum() / out.sum(), (yy * out).sum() / out.sum())
    mapped = resize_map.map_points(np.array([x0]), np.array([y0]))
    np.testing.assert_allclose([mapped[0][0], mapped[1][0]], centroid, atol=0.05)


def test_stretch_maps_corners_and_scales_sigma_per_axis():
    m = ResizeMap.create((100, 200), 50, "stretch")
    x, y = m.map_points(np.array([-0.5, 199.5]), np.array([-0.5, 99.5]))
    np.testing.assert_allclose(x, [-0.5, 49.5])
    np.testing.assert_allclose(y, [-0.5, 49.5])
    assert m.map_sigma(100) == (50.0, 25.0)


def test_pad_keeps_aspect_centres_and_leaves_black_borders():
    m = ResizeMap.create((300, 150), 60, "pad")
    assert m.inner_shape == (60, 30) and (m.offset_y, m.offset_x) == (0, 15)
    assert m.map_sigma(10) == (2.0, 2.0)
    out = m.resize(np.ones((300, 150), np.float32))
    assert out[:, :15].max() == 0 and out[:, 45:].max() == 0
    np.testing.assert_allclose(out[:, 15:45], 1.0, atol=1e-6)
    x1, x2, y1, y2 = m.map_boxes(np.array([0.0]), np.array([149.0]), np.array([0.0]), np.array([299.0]))
    assert 14.5 < x1[0] < 15.5 and 43.5 < x2[0] < 44.5 and -0.5 < y1[0] < 0.5 and 58.5 < y2[0] < 59.5


@pytest.mark.parametrize("mode", ["stretch", "pad"])
def test_resize_equals_torch_antialiased_bilinear(mode):
    image = np.random.default_rng(0).random((310, 240)).astype(np.float32)
    m = ResizeMap.create(image.shape, 56, mode)
    h, w = m.inner_shape
    expected = F.interpolate(torch.from_numpy(image)[None, None], size=(h, w), mode="bilinear",
                             antialias=True, align_corners=False)[0, 0].numpy()
    inner = m.resize(image)[m.offset_y:m.offset_y + h, m.offset_x:m.offset_x + w]
    np.testing.assert_allclose(inner, expected, atol=1e-5)
