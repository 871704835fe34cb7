"""cxrgaze: explainable chest X-ray classifiers supervised by radiologist eye gaze.

The library knows nothing of DVC or of the command line: ``cxrgaze.cli`` and the
``pipelines/`` stage entries are thin layers over the functions here.
"""

__version__ = "0.1.0"

CLASSES: tuple[str, ...] = ("Normal", "CHF", "pneumonia")
"""Class order used everywhere: label columns, logits, probabilities, reports."""
