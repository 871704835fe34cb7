"""Serving the registered model: DICOM in, diagnosis and heatmap out.

- :mod:`cxrgaze.serving.preprocess`: image bytes -> model input, by ``prepare``'s code.
- :mod:`cxrgaze.serving.gate`: which images get a diagnosis (chest radiographs only).
- :mod:`cxrgaze.serving.model`: the MLflow pyfunc (input/output contract, error policy).
- :mod:`cxrgaze.serving.log`: ``log_model`` logs that pyfunc into the active MLflow run.
- :mod:`cxrgaze.serving.server`: cxrgaze's scoring app (MLflow's, with raw DICOM bodies in front).
- :mod:`cxrgaze.serving.serve`: ``cxrgaze serve``, that app under uvicorn.
- :mod:`cxrgaze.serving.predict`: ``cxrgaze predict``, the same model offline on files.
- :mod:`cxrgaze.serving.pacs`: ``cxrgaze predict --dicomweb``, a PACS study in, report and heatmaps stored back.
"""
