"""jaxattr: training-data attribution with forward-only queries."""

from jaxattr._curvature import GaussNewton
from jaxattr._intraining import InTraining, InTrainingState, in_training
from jaxattr._posthoc import simulate
from jaxattr._readout import JVP, CentralDifference, ForwardDifference
from jaxattr._scoring import Scorer, TopK, scorer
from jaxattr._sketch import DenseSketch, SketchInfo
from jaxattr._task import Task, classification
from jaxattr._version import __version__

__all__ = [
    "CentralDifference",
    "DenseSketch",
    "ForwardDifference",
    "GaussNewton",
    "InTraining",
    "InTrainingState",
    "JVP",
    "Scorer",
    "SketchInfo",
    "Task",
    "TopK",
    "__version__",
    "classification",
    "in_training",
    "scorer",
    "simulate",
]
