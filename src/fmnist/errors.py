"""Errors a user can act on: each carries one line that names the file or key and what is wrong."""


class PipelineError(Exception):
    """A problem with the user's parameters, data or environment, reported as one line, no traceback."""


class ParamsError(PipelineError):
    """A value in params.yaml that is unknown, of the wrong type or out of range."""


class DataError(PipelineError):
    """A data file that is missing, corrupt or not what the stage expects."""


class SourceError(PipelineError):
    """A download source (mirror or official location) that cannot provide a file."""
