"""Tools: fit models, predict expression and pathway scores, evaluate."""

from ._base import BaseModel
from ._benchmark import benchmark
from ._cross_validate import cross_validate
from ._evaluate import evaluate
from ._fit import fit
from ._model import TrainedModel
from ._predict import predict
from ._prediction_table import prediction_table
from ._superres import SuperResModel, fit_superres
from ._superres_cv import cross_validate_superres
from ._superres_evaluate import evaluate_superres
from ._superres_predict import predict_superres

__all__ = [
    "BaseModel",
    "SuperResModel",
    "TrainedModel",
    "benchmark",
    "cross_validate",
    "cross_validate_superres",
    "evaluate",
    "evaluate_superres",
    "fit",
    "fit_superres",
    "predict",
    "predict_superres",
    "prediction_table",
]
