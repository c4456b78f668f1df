"""Local Ray runs without a dashboard: the driver drops Ray Train's PlacementGroupCleaner State-API warning
(once a second for a whole run) and keeps every other worker line."""

import json
import os
import subprocess
import sys

SCRIPT = """
import json, dawn, ray
from ray._private.ray_logging import stdout_deduplicator
lines = ["Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. "
         "Continuing to monitor.", "step 3 loss 0.25"]
batches = stdout_deduplicator.deduplicate({"ip": "127.0.0.1", "pid": 7, "actor_name": "x", "lines": lines})
print(json.dumps([line for batch in batches for line in batch["lines"]]))
"""


def test_driver_skips_the_placement_group_cleaner_warning():
    env = {k: v for k, v in os.environ.items() if k != "RAY_DEDUP_LOGS_SKIP_REGEX"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == ["step 3 loss 0.25"]
