"""jaxattr: training-data attribution with forward-only queries."""

from jaxattr._curvature import GaussNewton
from jaxattr._intraining import InTraining, InTrainingState, in_training
from jaxattr._lowrank import Eigenbasis, LowRank
from jaxattr._posthoc import Relative, default_curvature, simulate
from jaxattr._readout import JVP, CentralDifference, ForwardDifference
from jaxattr._scoring import Scorer, TopK, scorer
from jaxattr._sketch import DenseSketch, SketchInfo
from jaxattr._task import Task, classification
from jaxattr._version import __version__

__all__ = [
    "CentralDifference",
    "DenseSketch",
    "Eigenbasis",
    "ForwardDifference",
    "GaussNewton",
    "InTraining",
    "InTrainingState",
    "JVP",
    "LowRank",
    "Relative",
    "Scorer",
    "SketchInfo",
    "Task",
    "TopK",
    "__version__",
    "classification",
    "default_curvature",
    "in_training",
    "scorer",
    "simulate",
]
