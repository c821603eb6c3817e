"""Benchmarks: prompt sets and their evaluators (GenEval, UniGenBench), and the runner behind
``flowalign eval`` and ``flowalign sample``. Importing this package imports no model library."""
