"""Analysis: find the layer stack of a graph, derive its surrogate, plan the rewrite."""

from .plan import StackPlan, analyse, cap_iters
from .stack import Layer, LayerStackMatch, NotAStack
from .surrogate import SurrogateError

__all__ = ["Layer", "LayerStackMatch", "NotAStack", "StackPlan", "SurrogateError", "analyse", "cap_iters"]
