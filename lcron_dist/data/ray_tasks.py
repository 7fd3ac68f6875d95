"""Bodies of the Ray Data tasks the Ray reader submits.

Every Ray worker that runs one imports this module, so it imports only numpy and pyarrow: a task
defined beside the reader would make each worker import torch and TorchRec first (3.6 s of CPU per
worker process, and Ray starts a dozen of them over a job).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def keep_requests(batch: pa.Table, wanted: np.ndarray) -> pa.Table:
    """The rows of `batch` whose request id is in `wanted`."""
    return batch.filter(pc.is_in(batch.column("request_id"), value_set=pa.array(wanted)))
