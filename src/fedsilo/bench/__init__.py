"""Benchmarks run by `fedsilo bench`: federated against centralized and local-only training."""
