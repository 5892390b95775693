"""The one CSV schema of every benchmark row (dense ops, grouped, multi-LoRA, layer step,
host time): the columns, their types and what each holds. benchmarks/results.py reads and writes
it; benchmarks/README.md lists the same."""

from __future__ import annotations

# (column, type); empty cells read back as None. Times in milliseconds, bandwidth in GB/s.
COLUMNS: tuple[tuple[str, type], ...] = (
    ("op", str), ("provider", str), ("gemm", str), ("mode", str),
    ("M", int), ("K", int), ("N", int), ("r", int), ("p", float), ("dtype", str),
    ("variant", str), ("experts", int), ("topk", int), ("layout", str), ("n_slots", int),
    ("split", str), ("tokens", str), ("spec", str),
    ("median_ms", float), ("p20_ms", float), ("p80_ms", float), ("rounds", int),
    ("x_frozen", float), ("tokens_per_s", float), ("host_us", float),
    ("tflops", float), ("gbps", float), ("roofline_frac", float), ("floor_ms", float),
    ("saved_bytes", int), ("saved_bytes_with_params", int), ("peak_mem_bytes", int),
    ("check_err", float), ("paths", str), ("note", str),
    ("device", str), ("torch", str), ("triton", str), ("date", str),
)
COLUMN_NAMES = tuple(name for name, _ in COLUMNS)
# What each column holds (benchmarks/README.md lists the same).
COLUMN_DOCS: dict[str, str] = {
    "op": "lora_linear | norm_lora | grouped_lora_linear | multi_lora_linear | layer",
    "provider": "frozen (the base alone), eager, peft, compile, triton, cuda, fused, separate, "
                "megatron-bridge",
    "gemm": "GEMM strategy of a fused provider: fused | cublas | auto (empty otherwise)",
    "mode": "forward | backward | fwd+bwd | host",
    "M": "rows (tokens; grouped: tokens x top-k routed rows)",
    "K": "input features (layer: hidden)",
    "N": "output features (layer: ffn)",
    "r": "LoRA rank", "p": "dropout probability", "dtype": "tensor dtype",
    "variant": "sub-case beyond (M, K, N, r, p, dtype), part of the shape key: grouped "
               "E<experts>-top<k>-<layout>, multi n<slots>-<split>, layer "
               "<spec>-L<layers>-a<heads>/<kv>-s<seq>x<batch>; empty for the dense ops",
    "experts": "grouped: number of experts", "topk": "grouped: experts per token",
    "layout": "grouped: adapter layout, shared (Megatron-Bridge's default) | per_expert",
    "n_slots": "multi: adapter slots", "split": "multi: token split, even | uneven",
    "tokens": "grouped: rows per expert, multi: rows per slot ('/'-joined)",
    "spec": "layer: mcore-local | mcore-te | te-standin | torch",
    "median_ms": "median time per call (CUDA events, L2 flushed, on a GPU; host clock on a CPU)",
    "p20_ms": "20th percentile of the reps", "p80_ms": "80th percentile of the reps",
    "rounds": "timed reps", "x_frozen": "median_ms / the frozen provider's, same shape and mode",
    "tokens_per_s": "layer: tokens per second of the training step",
    "host_us": "host time per call, kernel time taken out (mode host)",
    "tflops": "FLOP/s of the LoRA work (roofline.py; layer: the frozen step's FLOPs)",
    "gbps": "minimal bytes moved / time", "roofline_frac": "floor_ms / median_ms",
    "floor_ms": "roofline floor from the rates measured in the same run (rates.json)",
    "saved_bytes": "bytes saved for backward, weights aside (each storage once)",
    "saved_bytes_with_params": "the same with the weights", "peak_mem_bytes": "peak GPU memory "
    "above what was allocated before the call", "check_err": "largest relative error against "
    "the fp64 reference (values and every gradient)",
    "paths": "layer: the path each LoRA layer took (fused backend, or eager and why)",
    "note": "skipped: why / FAILED check: what / interpreted: not timed / other remarks",
    "device": "GPU name or CPU model", "torch": "torch version", "triton": "triton version",
    "date": "when measured (ISO 8601)",
}
SHAPE_KEY = ("op", "M", "K", "N", "r", "p", "dtype", "variant")
# ops whose rows carry a ``variant`` (sub-cases beyond the shape)
VARIANT_OPS = ("layer", "grouped_lora_linear", "multi_lora_linear")
