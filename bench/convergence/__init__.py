"""Convergence workloads for lorecomm (issue 5): data, models, methods, training loops, plots.

Import as ``convergence`` with ``bench/`` on ``sys.path`` (the scripts do this themselves).
"""
