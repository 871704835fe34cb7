"""cxrgaze: explainable chest X-ray classifiers supervised by radiologist eye gaze.

The library knows nothing of DVC or of the command line: ``cxrgaze.cli`` and the
``pipelines/`` stage entries are thin layers over the functions here.
"""

__version__ = "0.1.0"

CLASSES: tuple[str, ...] = ("Normal", "CHF", "pneumonia")
"""Class order used everywhere: label columns, logits, probabilities, reports."""

DATA_VERSION_ENV = "CXRGAZE_DATA_VERSION"
"""Environment variable with the data version every MLflow run is tagged with
(``cxrgaze.data_version``). The library does not know where data is versioned: the entry
points that do (the CLI and the DVC stages, through :mod:`cxrgaze.layout`: the md5 that
DVC records for the data) set it, and spawned tuning workers and ``torchrun`` ranks inherit it."""
