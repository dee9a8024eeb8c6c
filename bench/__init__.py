"""Benchmarks of jaxattr against retraining ground truth and other methods.

``python -m bench.lds`` runs the LDS benchmark; see bench/README.md.
"""
