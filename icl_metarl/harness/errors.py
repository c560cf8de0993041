"""The one exception type for bad user input: the command line prints its message as one line, exit 2."""


class UsageError(ValueError):
    """A value given by the user (name, path, setting, file) that cannot be used; the message names it."""


def choice_error(what: str, value, allowed) -> UsageError:
    """A UsageError for a value outside a fixed set, listing the allowed values."""
    allowed = list(allowed)
    shown = ", ".join(map(str, allowed[:60])) + (", ..." if len(allowed) > 60 else "")
    return UsageError(f"unknown {what} {value!r}; valid: {shown}")
