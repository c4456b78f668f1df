"""dawn: train and serve DAWN talking-head diffusion (Cheng et al.) with Ray, DeepSpeed and MLflow."""

__version__ = "0.1.0"


class DawnError(Exception):
    """An error caused by the user's input (a file, a flag, a checkpoint), with a message naming it.

    The CLI prints the message and exits non-zero instead of showing a traceback; the Serve app maps it
    to a 4xx response; batch jobs record it in their failures table.
    """
