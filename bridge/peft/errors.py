"""The exceptions of ``bridge.peft``.

Megatron-Bridge raises ``AssertionError`` for a bad configuration and ``NotImplementedError`` for
an unsupported layer or option; code written against it may catch those. Each class here is both
the exception upstream raises and the one that describes the problem (``ValueError`` for a bad
value, ``TypeError`` for a module of the wrong kind), so either ``except`` clause catches it, and
the message says what to do.
"""

from __future__ import annotations

__all__ = ["BaseOutputError", "MergeError", "PEFTConfigError", "UnsupportedModuleError",
           "UnsupportedOptionError"]


class PEFTConfigError(ValueError, AssertionError):
    """A PEFT configuration that cannot work (Megatron-Bridge asserts on these)."""


class UnsupportedModuleError(NotImplementedError, TypeError):
    """A module an adapter cannot wrap (Megatron-Bridge raises NotImplementedError)."""


class UnsupportedOptionError(ValueError, NotImplementedError):
    """An option value that is not implemented, e.g. an unknown init method (Megatron-Bridge raises
    NotImplementedError)."""


class BaseOutputError(TypeError, AssertionError):
    """A wrapped base returned something no linear returns (Megatron-Bridge asserts)."""


class MergeError(RuntimeError):
    """A merge or unmerge that cannot be done (already merged, not merged, unsupported layer),
    or a save or load that a merged layer would get wrong (``bridge.peft.lora_merge``)."""
