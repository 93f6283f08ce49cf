"""Rewrite: replace a planned layer stack by one StackProgram call, with its layer graphs."""

from .graph import rewrite_stack
from .lowering_list import Lowering, LoweringList, Where

__all__ = ["Lowering", "LoweringList", "Where", "rewrite_stack"]
