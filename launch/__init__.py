"""Entry points and launch tooling: train.py, eval.py, supervise.py, plan.py, the benchmarks and scripts (README)."""
