"""Models-from-code entry of the served model: MLflow runs this file to get the pyfunc.

``cxrgaze.serving.log.log_model`` logs it with the ``cxrgaze`` package as ``code_paths``,
so a server started from the registry imports the package copy stored with the model.
"""

import mlflow

from cxrgaze.serving.model import CxrGazeModel

mlflow.models.set_model(CxrGazeModel())
