"""Put this folder on PYTHONPATH to run Python as if megatron-core were not installed (as on the
GPU image, which lacks it): ``import megatron...`` and ``importlib.util.find_spec("megatron.x")``
raise ModuleNotFoundError, as they do when the package is absent. benchmarks/gpu_check.sh's dry run
uses it (GPU_CHECK_HIDE_MEGATRON=1) to prove its tests and benchmarks run without megatron-core.
Subprocesses inherit it through the environment. (A top-level ``find_spec("megatron")`` raises too,
where a missing package would return None; nothing in this repository calls that.)"""

import importlib.abc
import sys


class _HideMegatron(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "megatron" or fullname.startswith("megatron."):
            raise ModuleNotFoundError(f"No module named {fullname!r} (hidden by "
                                      "benchmarks/hide_megatron)", name=fullname)
        return None


sys.meta_path.insert(0, _HideMegatron())
