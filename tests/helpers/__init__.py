"""Helpers the tests share: reference logits, captured dynamo graphs, import scans, the Triton interpreter
and the example scripts loaded by file path."""
