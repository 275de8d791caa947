"""MLflow "model from code" entry point for imgcls models (see imgcls_core/packaging.py)."""

from mlflow.models import set_model

from imgcls_core.packaging import ImgclsModel

set_model(ImgclsModel())
