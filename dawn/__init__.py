"""dawn: train and serve DAWN talking-head diffusion (Cheng et al.) with Ray, DeepSpeed and MLflow."""

import os

__version__ = "0.1.0"

# A local Ray started without its dashboard (the demo, local training runs) has no State API, so Ray Train's
# PlacementGroupCleaner logs this warning about once a second for the whole run; it is harmless there (the
# controller is alive), so the driver skips the line. Ray reads the variable when it is first imported.
os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", "Failed to query Ray Train Controller actor state")


# How a job command finds its cluster (the help text of `dawn preprocess` and `dawn train`)
RAY_CLUSTER_HELP = ("With RAY_ADDRESS set (as under `ray job submit`) the job joins that cluster; otherwise a local "
                    "Ray starts.")


class DawnError(Exception):
    """An error caused by the user's input (a file, a flag, a checkpoint), with a message naming it.

    The CLI prints the message and exits non-zero instead of showing a traceback; the Serve app maps it
    to a 4xx response; batch jobs record it in their failures table.
    """
