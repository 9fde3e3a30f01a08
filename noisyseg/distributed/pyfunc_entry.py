"""MLflow "models from code" entry point of the registered noisyseg model.

``mlflow.pyfunc.log_model(python_model=<this file>)`` copies this file into the logged model;
``mlflow.pyfunc.load_model`` runs it, and :func:`mlflow.models.set_model` hands MLflow the model
object, so loading never unpickles code (the weights load with ``weights_only=True``). See
:mod:`noisyseg.distributed.registry`.
"""

from mlflow.models import set_model

from noisyseg.distributed.registry import NoisysegUNet

set_model(NoisysegUNet())
