"""Benchmark harness for the fused LoRA ops (pytest-benchmark based). Entry point: ``python -m
benchmarks.run`` (``make bench``); see benchmarks/README.md."""
