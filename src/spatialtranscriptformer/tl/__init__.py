"""Tools: fit models, predict expression and pathway scores, evaluate."""

from ._benchmark import benchmark
from ._cross_validate import cross_validate
from ._evaluate import evaluate
from ._fit import fit
from ._model import TrainedModel
from ._predict import predict

__all__ = ["TrainedModel", "benchmark", "cross_validate", "evaluate", "fit", "predict"]
