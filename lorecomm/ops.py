"""Temporary: the runtime's entry to the compressed-step ops (pure torch).

Replaced by the wrappers over the compiled ``torch.ops.lorecomm`` library.
"""
from ._reference import decompress, probe_normal, project_residual, score_paper, score_sketch  # noqa: F401

BACKEND = "python-reference"
