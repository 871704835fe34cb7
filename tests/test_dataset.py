"""Code tests for reading a prepared folder: the torch Dataset and whole-split tensors."""

import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from cxrgaze.data.dataset import PreparedDataset, load_split, random_affine
from cxrgaze.data.split import write_split

S = 16
IDS = [f"img-{i}" for i in range(9)]
LABELS = ["Normal", "CHF", "pneumonia"] * 3


@pytest.fixture
def prepared(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.random((9, S, S)).astype(np.float16)  # (N, S, S)
    gaze = rng.random((9, S, S)).astype(np.float16)
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "gaze.npy", gaze)
    pd.DataFrame({"dicom_id": IDS, "patient_id": [f"1000000{i}" for i in range(9)], "study_id": "5",
                  "label": LABELS, "index": range(9)}).to_csv(tmp_path / "manifest.csv", index=False)
    return tmp_path, images, gaze


def test_items_are_unit_range_single_channel_with_class_index(prepared):
    folder, images, gaze = prepared
    data = PreparedDataset(folder)
    assert len(data) == 9
    item = data[4]
    assert item["image"].shape == item["gaze"].shape == (1, S, S)
    assert item["image"].dtype == item["gaze"].dtype == torch.float32
    assert item["label"].dtype == torch.long and item["label"].item() == 1  # CHF
    assert item["dicom_id"] == "img-4"
    np.testing.assert_array_equal(item["image"][0].numpy(), images[4].astype(np.float32))
    np.testing.assert_array_equal(item["gaze"][0].numpy(), gaze[4].astype(np.float32))


def test_rows_by_ids_in_the_given_order(prepared):
    folder, images, _ = prepared
    data = PreparedDataset(folder, ["img-7", "img-2"])
    assert [data[i]["dicom_id"] for i in range(2)] == ["img-7", "img-2"]
    np.testing.assert_array_equal(data[0]["image"][0].numpy(), images[7].astype(np.float32))


def test_split_table_from_cxrgaze_split(prepared):
    folder, _, _ = prepared
    write_split(folder / "manifest.csv", folder / "split.csv")
    table = pd.read_csv(folder / "split.csv", dtype=str)
    for split in ("train", "val", "test"):
        data = PreparedDataset(folder, folder / "split.csv", split=split)
        assert data.dicom_ids == table.loc[table["split"] == split, "dicom_id"].tolist()
    assert len(PreparedDataset(folder, table)) == 9


def test_unknown_id_and_missing_manifest_are_clear_errors(prepared, tmp_path_factory):
    folder, _, _ = prepared
    with pytest.raises(ValueError, match=r"manifest\.csv: 1 id\(s\) not prepared, e\.g\. nope"):
        PreparedDataset(folder, ["img-1", "nope"])
    with pytest.raises(FileNotFoundError, match="no such manifest"):
        PreparedDataset(tmp_path_factory.mktemp("empty"))


def test_dataloader_batches_and_cheap_pickling(prepared):
    folder, _, _ = prepared
    data = PreparedDataset(folder)
    data[0]  # opens the memory maps
    assert len(pickle.dumps(data)) < 4000  # the arrays are not pickled
    batch = next(iter(DataLoader(data, batch_size=4)))
    assert batch["image"].shape == (4, 1, S, S) and batch["label"].tolist() == [0, 1, 2, 0]


def test_augmentation_moves_image_and_gaze_together(tmp_path):
    same = np.random.default_rng(1).random((3, S, S)).astype(np.float16)
    np.save(tmp_path / "images.npy", same)
    np.save(tmp_path / "gaze.npy", same)
    pd.DataFrame({"dicom_id": ["a", "b", "c"], "patient_id": "1", "study_id": "2",
                  "label": ["CHF"] * 3}).to_csv(tmp_path / "manifest.csv", index=False)
    torch.manual_seed(0)
    item = PreparedDataset(tmp_path, augment=True)[1]
    assert torch.equal(item["image"], item["gaze"])
    assert not torch.allclose(item["image"][0], torch.from_numpy(same[1].astype(np.float32)))
    assert 0 <= item["image"].min() and item["image"].max() <= 1


def test_random_affine_is_reproducible_with_a_generator():
    x = torch.rand(2, 1, S, S)
    a = random_affine(x, generator=torch.Generator().manual_seed(3))
    b = random_affine(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape


def test_load_split_gives_whole_split_tensors(prepared):
    folder, images, _ = prepared
    table = pd.DataFrame({"dicom_id": ["img-3", "img-0", "img-8"], "split": ["train", "val", "train"]})
    data = load_split(folder, table, "train")
    assert len(data) == 2 and data.dicom_ids == ["img-3", "img-8"]
    assert data.images.shape == data.gaze.shape == (2, 1, S, S) and data.images.dtype == torch.float16
    assert data.labels.dtype == torch.long and data.labels.tolist() == [0, 2]
    np.testing.assert_array_equal(data.images[1, 0].numpy(), images[8])
    assert len(load_split(folder)) == 9
