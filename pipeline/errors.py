"""The one error type the command line turns into a clean message and a non-zero exit."""


class PipelineError(Exception):
    """A problem the user can fix: bad parameters, a missing or broken file, a bad prompt."""
