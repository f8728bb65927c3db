"""The runner's own errors, and how any error is told in one line (a run's ``error`` tag, the summary)."""


class RunnerError(Exception):
    """A problem the user can fix; its message names the key, the value and the fix."""


def one_line(error: BaseException) -> str:
    """The error's first line; prefixed with its type unless it is one of the runner's own."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if isinstance(error, RunnerError):
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
