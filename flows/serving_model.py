"""The code file of the logged pyfunc model (MLflow "models from code"): MLflow runs it when the
model loads, instead of unpickling an object. Only MLflow imports it (``model_registry.log_model``)."""

from mlflow.models import set_model

from flows.serving import SegmenterModel

set_model(SegmenterModel())
