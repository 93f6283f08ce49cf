"""Autotuning: the fastest SNLP configuration of a model within a quality budget."""

from .measure import Measure, ModelMeasure
from .result import Baseline, Point, TuneResult
from .tuner import tune

__all__ = ["Baseline", "Measure", "ModelMeasure", "Point", "TuneResult", "tune"]
