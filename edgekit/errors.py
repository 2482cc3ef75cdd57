"""User errors: one line that names the problem and the fix. Anything else is a bug and keeps its traceback."""

from __future__ import annotations


class EdgekitError(Exception):
    """A problem with the user's input or environment, reported as one line with a fix and a non-zero exit."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.problem} (fix: {self.fix})" if self.fix else self.problem


class GateFailed(EdgekitError):
    """An artifact did not reproduce PyTorch closely enough."""

    exit_code = 3
