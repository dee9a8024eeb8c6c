"""jaxattr: training-data attribution with forward-only queries."""

from jaxattr._builders import (
    Adaptive,
    CurvatureBasis,
    Dense,
    Grouped,
    InBasis,
    LayerLowRank,
    Projected,
    compress,
)
from jaxattr._curvature import GaussNewton
from jaxattr._ensemble import Ensemble
from jaxattr._intraining import InTraining, InTrainingState, in_training
from jaxattr._io import load_sketch, load_state, save_sketch, save_state
from jaxattr._lowrank import Eigenbasis, LowRank, eigenbasis
from jaxattr._posthoc import Relative, default_curvature, simulate
from jaxattr._readout import JVP, CentralDifference, ForwardDifference
from jaxattr._rerank import rerank
from jaxattr._scoring import Scorer, TopK, scorer
from jaxattr._sharding import shard_sketch
from jaxattr._sketch import (
    DenseSketch,
    FactoredSketch,
    LayerLowRankSketch,
    RandomBasis,
    SketchInfo,
)
from jaxattr._task import Task, classification
from jaxattr._version import __version__

__all__ = [
    "Adaptive",
    "CentralDifference",
    "CurvatureBasis",
    "Dense",
    "DenseSketch",
    "Eigenbasis",
    "Ensemble",
    "FactoredSketch",
    "ForwardDifference",
    "GaussNewton",
    "Grouped",
    "InBasis",
    "InTraining",
    "InTrainingState",
    "JVP",
    "LayerLowRank",
    "LayerLowRankSketch",
    "LowRank",
    "Projected",
    "RandomBasis",
    "Relative",
    "Scorer",
    "SketchInfo",
    "Task",
    "TopK",
    "__version__",
    "classification",
    "compress",
    "default_curvature",
    "eigenbasis",
    "in_training",
    "load_sketch",
    "load_state",
    "rerank",
    "save_sketch",
    "save_state",
    "scorer",
    "shard_sketch",
    "simulate",
]
