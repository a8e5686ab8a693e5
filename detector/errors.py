"""Errors shared by the converter and the runtime."""

from __future__ import annotations


class UnsupportedModuleError(ValueError):
    """The model holds modules that cannot be turned into spiking ones; lists every one."""

    def __init__(self, problems: list[tuple[str, str, str]], hint: str = ""):
        self.problems = problems
        lines = [f"  {path or '<root>'} ({kind}): {why}" for path, kind, why in problems]
        super().__init__("cannot convert these modules:\n" + "\n".join(lines) + (f"\n{hint}" if hint else ""))
