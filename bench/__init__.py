"""Benchmarks, the GPU run and the byte/launch ledger of lfm.

- `bench.gpu_suite` (`make gpu-suite`): the one GPU command, prioritized tiers within a time budget; its
  pytest plugin `bench.suite_plugin`; `bench.results`: its JSON-lines results file.
- `bench/bench_*.py`: pytest-benchmark files, one per op plus end to end and the host time of one batch-1
  forward with launches stubbed out (`make bench` on CPU).
- `bench.harness`: the one timing helper; `bench.providers`: the providers and the shared weights;
  `bench.report`: the one table writer (`python -m bench.report FILE.jsonl`).
- `bench.authors`: the authors' model written the way their code computes it, the eager baseline.
- `bench.ledger`: bytes moved and kernel launches per image, counted on CPU (`python -m bench.ledger`).
- `bench.tune`: a launch-option sweep of the Triton kernels on a GPU (`python -m bench.tune`).
- `bench.workloads`: every Triton launch of LFM from a real forward and backward, which `bench.tune` and
  `bench.compile_report` (every launch compiled for sm_80 and sm_90 without a GPU) record.
"""
