"""``log_model``: the served pyfunc, with its code, config and signature, into the active run.

The logged model is "models from code" (``model_code.py``) and carries the ``cxrgaze``
package itself (``code_paths``), so the preprocessing that serves a model is the code it
was logged with, and ``mlflow models serve --env-manager local`` needs only the
third-party libraries, which the model lists as exact pins of the versions installed when
it was logged (no requirement inference: no extra load of the model at logging).
"""

from __future__ import annotations

import base64
import tempfile
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

from cxrgaze import CLASSES
from cxrgaze.checkpoint import checkpoint_variant, load_checkpoint
from cxrgaze.config import DataConfig
from cxrgaze.data.synth.anatomy import sample_anatomy
from cxrgaze.data.synth.dicom import Acquisition, encode, stored_pixels
from cxrgaze.data.synth.phantom import render
from cxrgaze.serving.model import (ARTIFACT_CHECKPOINT, ARTIFACT_CONFIG, INPUT_COLUMN, default_heatmap, output_columns,
                                   write_config)
from cxrgaze.serving.gate import Gate
from cxrgaze.serving.preprocess import Limits

PACKAGE_DIR = Path(__file__).resolve().parents[1]
"""The ``cxrgaze`` package folder, logged with the model as its code."""
MODEL_CODE = Path(__file__).with_name("model_code.py")

SERVING_REQUIREMENTS: tuple[str, ...] = (
    "mlflow", "torch", "torchvision", "segmentation-models-pytorch", "timm", "grad-cam", "pydicom", "pylibjpeg",
    "pylibjpeg-openjpeg", "pylibjpeg-libjpeg", "pylibjpeg-rle", "numpy", "pandas", "pillow", "pyyaml", "scipy",
    "scikit-learn", "tqdm",
)
"""Distributions the served model imports (directly or through ``cxrgaze``)."""


def signature(data_config: DataConfig, has_decoder: bool, classes: tuple[str, ...] = CLASSES) -> ModelSignature:
    """Input ``image`` (string), params ``heatmap`` and ``heatmap_size``, the output columns."""
    outputs = [ColSpec(DataType.double if name.startswith("prob_") else DataType.string, name)
               for name in output_columns(classes)]
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, INPUT_COLUMN)]),
        outputs=Schema(outputs),
        params=ParamSchema([ParamSpec("heatmap", DataType.string, default_heatmap(has_decoder)),
                            ParamSpec("heatmap_size", DataType.long, data_config.image_size)]),
    )


def example_dicom(side: int = 128) -> bytes:
    """A DICOM made for the purpose of being the logged model's input example: a synthetic
    PA chest phantom (``side`` x ``side``, 12-bit DX, explicit VR little endian) with fixed,
    made-up identifiers. Never a file of the user's data: patient data must not travel
    inside a model artifact."""
    rng = np.random.default_rng(0)
    phantom = render(sample_anatomy(rng, "Normal"), side, side, rng)
    acq = Acquisition(syntax="explicit", monochrome1=False, rescale=None, window=False, low=200, high=3800)
    return encode(stored_pixels(phantom.image, acq), acq, dicom_id="cxrgaze-input-example", patient_id="EXAMPLE",
                  study_id="1", sex="O", study_date="20000101", spacing_mm=0.7, burned_in=False, shape=(side, side))


def log_model(checkpoint: Path, data_config: DataConfig, input_example: bytes | None = None, name: str | None = None,
              limits: Limits = Limits(), gate: Gate = Gate()) -> ModelInfo:
    """Log the served model of ``checkpoint`` into the active MLflow run, named ``name``
    (default: the checkpoint's variant); register ``.model_uri``.

    ``data_config`` must be the one ``prepare`` used for the training arrays (it drives the
    served preprocessing); ``input_example`` is the bytes of a DICOM logged base64 as the
    model's input example (default :func:`example_dicom`, made for the purpose);
    ``limits`` bound each served image (overridable where the model runs, see
    :class:`~cxrgaze.serving.preprocess.Limits`); ``gate`` says which images get a diagnosis
    (also overridable there, see :class:`~cxrgaze.serving.gate.Gate`).
    """
    input_example = example_dicom() if input_example is None else input_example

    variant = checkpoint_variant(load_checkpoint(checkpoint))
    has_decoder, name = variant.has_decoder, name or variant.name
    example = pd.DataFrame({INPUT_COLUMN: [base64.b64encode(input_example).decode("ascii")]})
    with tempfile.TemporaryDirectory(prefix="cxrgaze-serving-") as tmp:
        config = write_config(Path(tmp) / "serving_config.json", data_config, CLASSES, limits, gate)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(MODEL_CODE),
            artifacts={ARTIFACT_CHECKPOINT: str(checkpoint), ARTIFACT_CONFIG: str(config)},
            code_paths=[str(PACKAGE_DIR)],
            signature=signature(data_config, has_decoder),
            input_example=example,
            pip_requirements=[f"{dist}=={version(dist)}" for dist in SERVING_REQUIREMENTS],
        )
