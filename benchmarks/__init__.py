"""jaxkv benchmarks: one script per subject (bench_*.py), run together by ``python -m benchmarks``."""
