"""The MLflow model of every model g2d registers, as MLflow's "models from code": this file is logged as the
model's code and run again to load it, so loading unpickles nothing. The weights travel as an artifact, the
model folder g2d wrote (safetensors + config.yaml), and g2d/serving.py answers the requests.

    model = mlflow.pyfunc.load_model("models:/g2d-encoder@champion")
    model.predict(pd.DataFrame({"image": [png_bytes], "prompts": [["pleural effusion"]]}))

A request g2d cannot answer becomes an MlflowException with INVALID_PARAMETER_VALUE: `mlflow models serve`
answers it with HTTP 400 and the one-line message (any other exception would also be a 400 there, but with a
stack trace and the whole request echoed)."""

from __future__ import annotations

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

ARTIFACT = "g2d_model"  # the name of the model folder among the MLflow model's artifacts


class G2DModel(PythonModel):
    def load_context(self, context) -> None:
        from pathlib import Path

        from g2d import serving

        self.served = serving.load(Path(context.artifacts[ARTIFACT]))

    def predict(self, context, model_input, params=None):
        from g2d.errors import G2DError

        try:
            from g2d import serving

            return serving.predict(self.served, model_input)
        except G2DError as e:
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None


mlflow.models.set_model(G2DModel())
