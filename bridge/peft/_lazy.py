"""Module-level names of upstream's ``utils`` / ``module_matcher`` that need megatron-core, resolved
on first access (PEP 562) so ``import bridge.peft`` stays light and works without megatron.

``ColumnParallelLinear`` / ``RowParallelLinear``: megatron-core's (None without it).
``HAVE_TE``: megatron-core's transformer-engine wrappers are real classes (TE installed), as
upstream's flag means.
``TECL`` / ``TERL``: those wrappers' column- and row-parallel classes (empty without them).
Each is stored in the asking module's globals once resolved, so a test may patch it there.
"""

from __future__ import annotations

_MEGATRON = ("ColumnParallelLinear", "RowParallelLinear")
_TE = ("HAVE_TE", "TECL", "TERL")
NAMES = _MEGATRON + _TE


def _megatron() -> dict:
    try:
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    except ImportError:  # megatron-core is optional: plain nn.Linear still works
        ColumnParallelLinear = RowParallelLinear = None  # noqa: N806
    return {"ColumnParallelLinear": ColumnParallelLinear, "RowParallelLinear": RowParallelLinear}


def _te() -> dict:
    try:
        from megatron.core.extensions import transformer_engine as te_ext
    except Exception:  # noqa: BLE001 - no megatron, or its TE module fails to import
        return {"HAVE_TE": False, "TECL": (), "TERL": ()}
    column = ("TEColumnParallelLinear", "TELayerNormColumnParallelLinear",
              "TEColumnParallelGroupedLinear")
    row = ("TERowParallelLinear", "TERowParallelGroupedLinear")
    # without transformer-engine megatron defines placeholders (mocks, None), not classes
    have = all(isinstance(getattr(te_ext, n, None), type) for n in (*column, *row, "TELinear"))
    return {"HAVE_TE": have,
            "TECL": tuple(getattr(te_ext, n) for n in column) if have else (),
            "TERL": tuple(getattr(te_ext, n) for n in row) if have else ()}


def resolve(module_globals: dict, name: str):
    """The value of ``name`` (one of NAMES) for the module whose globals are given."""
    if name not in module_globals:
        module_globals.update({k: v for k, v in (_megatron() if name in _MEGATRON
                                                 else _te()).items() if k not in module_globals})
    return module_globals[name]


def megatron_linears(module_globals: dict) -> tuple[type | None, type | None]:
    """(ColumnParallelLinear, RowParallelLinear) as the module with these globals names them
    (None without megatron; a test may patch them there)."""
    return (resolve(module_globals, "ColumnParallelLinear"),
            resolve(module_globals, "RowParallelLinear"))


def module_getattr(module_name: str, module_globals: dict, name: str):
    """A module's ``__getattr__`` for NAMES."""
    if name in NAMES:
        return resolve(module_globals, name)
    raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
