"""The registered model's code, logged with MLflow "models from code".

Loading a registered version runs this file (copied into the model) instead of unpickling an object, so a
model from the registry executes no pickled code; the adapter and base weights are safetensors.
"""

import mlflow

from loraops.serving.pyfunc import LoraQAModel

mlflow.models.set_model(LoraQAModel())
