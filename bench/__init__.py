"""Benchmarks and the byte/launch ledger of lfm.

- `bench.ledger`: bytes moved and kernel launches per image, counted on CPU without a GPU
  (`python -m bench.ledger`).
- `bench/bench_*.py`: pytest-benchmark files, one per op plus end to end (`make bench`, `make gpu-suite`).
- `bench.harness`: the one timing helper and the providers; `bench.report`: the one table writer.
- `bench.authors`: the authors' model written the way their code computes it, the eager baseline.
"""
