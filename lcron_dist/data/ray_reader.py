"""The Ray reader (`--data.reader=ray`): Ray Data read tasks stream a day's Parquet shards to a rank.

Each rank asks Ray for its own requests of the day — the ones the global batch plan gives it — so it
receives exactly the batches the local reader would give it, while the reading and filtering run as
Ray tasks (locally or on a cluster) and the next day streams in while the current one trains
(DayReader.prefetch).
"""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lcron_dist.data import dataset
from lcron_dist.data.ray_tasks import keep_requests
from lcron_dist.data.reader import DayArrays, DayReader, table_to_arrays


def init_ray(address: str, num_cpus: int, object_store_mb: int, local_rank: int = 0, wait_s: float = 120.0) -> None:
    """Join the Ray cluster at `address`, or share one local Ray per machine.

    Without an address, local rank 0 starts a Ray sized for a small machine and the other ranks of
    the machine join it. It gets `num_cpus` logical CPUs (more than the cores): read tasks must find a
    free slot even while train workers hold theirs, or the job waits forever.
    """
    import ray
    from ray.data import DataContext

    context = DataContext.get_current()  # of this process, which builds the datasets
    context.enable_progress_bars = False
    # Ray Data's V2 Parquet path starts a pool of footer-reading actors (new Python processes) for every
    # read: one day of one rank each, dozens per job. Our day shards are few and small; V1 reads their
    # footers in the process that builds the dataset.
    context.use_datasource_v2 = False
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster needs no token
    if address:
        ray.init(address=address, log_to_driver=False)
    elif local_rank == 0:
        ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=object_store_mb * 2**20,
                 log_to_driver=False)
    else:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                ray.init(address="auto", log_to_driver=False)
                break
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no local Ray started by local rank 0 within {wait_s:.0f} s") from None
                time.sleep(0.5)


class RayReader(DayReader):
    """A DayReader whose rows come from Ray Data.

    Args:
        address: Ray cluster address ("auto", "ray://host:port"); empty = a local Ray per machine.
        local_rank: this rank's index on its machine (rank 0 starts the local Ray).
        num_cpus, object_store_mb: size of a local Ray.
        Others as DayReader.
    """

    def __init__(self, root: Path, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 address: str = "", num_cpus: int = 4, object_store_mb: int = 512, local_rank: int = 0) -> None:
        super().__init__(root, batch_size, rank, world_size, seed)
        init_ray(address, num_cpus, object_store_mb, local_rank)

    def load_rows(self, day: dt.date, rows: np.ndarray) -> DayArrays:
        import ray

        files = [str(p) for p in dataset.day_files(self.root, day)]
        # The day's request ids in log order (one small column) say which requests `rows` are.
        ids = pq.read_table(files, columns=["request_id"], partitioning=None).column("request_id").to_numpy()
        wanted = ids[rows]
        ds = ray.data.read_parquet(files, partitioning=None, schema=dataset.arrow_schema(self.meta.num_candidates))
        ds = ds.map_batches(keep_requests, fn_kwargs={"wanted": np.sort(wanted)}, batch_format="pyarrow", batch_size=None)
        refs = ds.to_arrow_refs()
        table = pa.concat_tables(ray.get(refs)) if refs else dataset.arrow_schema(self.meta.num_candidates).empty_table()
        arrays = table_to_arrays(table)
        got = arrays["request_id"]
        order = np.argsort(got, kind="stable")
        at = order[np.searchsorted(got[order], wanted)]  # row of each wanted request, in plan order
        if len(got) != len(wanted) or not np.array_equal(got[at], wanted):
            raise RuntimeError(f"Ray returned {len(got)} of the {len(wanted)} requests asked for on {day}")
        return {name: values[at] for name, values in arrays.items()}
