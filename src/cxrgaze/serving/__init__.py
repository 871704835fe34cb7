"""Serving the registered model: DICOM in, diagnosis and heatmap out.

- :mod:`cxrgaze.serving.preprocess`: image bytes -> model input, by ``prepare``'s code.
- :mod:`cxrgaze.serving.model`: the MLflow pyfunc (input/output contract, error policy).
- :mod:`cxrgaze.serving.log`: ``log_model`` logs that pyfunc into the active MLflow run.
- :mod:`cxrgaze.serving.serve`: ``cxrgaze serve``, a wrapper of ``mlflow models serve``.
- :mod:`cxrgaze.serving.predict`: ``cxrgaze predict``, the same model offline on files.
"""
