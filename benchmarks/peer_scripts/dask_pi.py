"""S1 on Dask distributed (LocalCluster, worker processes = cores, one thread each)."""

from __future__ import annotations

import sys

from _harness import CORES, emit
from _pi import pi, time_blocks
from dask.distributed import Client, LocalCluster


def main(n: int) -> None:
    with LocalCluster(n_workers=CORES, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.submit(pi, 1000, pure=False).result()
        timings = time_blocks(lambda b, k: client.gather([client.submit(pi, k, pure=False) for _ in range(b)]), n)
    emit({"peer": "dask", "blocks": timings})


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000)
