"""Benchmark harness for the fused LoRA ops (pytest runs the cases, kernels/_timing.py times them).
Entry point: ``python -m benchmarks.run`` (``make bench``); see benchmarks/README.md."""
