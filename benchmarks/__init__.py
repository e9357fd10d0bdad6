"""numbanorm's benchmarks: the asv suite (``bench_*.py``) and the side-by-side report (``report.py``)."""
