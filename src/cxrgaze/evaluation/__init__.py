"""Evaluation of trained classifiers: statistics and reports computed from their outputs.

Each module is imported on its own, e.g. ``from cxrgaze.evaluation.bootstrap import
percentile_bootstrap``.
"""
