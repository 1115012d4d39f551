"""A multi-node Ray cluster on this machine for tests (ray.cluster_utils.Cluster), in its own
process so that the test process's own Ray is not disturbed.

    python tests/multinode.py WORKERS [GPUS_PER_NODE] [dashboard]

`dashboard`: the head serves Ray's dashboard and job API on 127.0.0.1, on a free port (for
`ray job submit`); without it, `include_dashboard=False` (less CPU for a cluster that takes
jobs only through its GCS address).

Prints one JSON line {"address": ..., "head": node id, "workers": [node ids], "dashboard":
"http://127.0.0.1:PORT" or null}, then takes commands on stdin: `remove I` kills worker I at
once (its raylet and workers, no graceful stop), waits until the cluster's GCS reports it dead,
and answers `removed` with the live node ids as JSON; `add GPUS` starts one more worker node of
1 CPU advertising GPUS GPUs and answers `added` with its node id; `quit` (or end of input)
shuts the cluster down.
"""

import json
import sys
from pathlib import Path

from ray.cluster_utils import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the project root
from tests.ray_heads import free_port  # noqa: E402 - outside the ephemeral range (its docstring)


def main() -> None:
    workers = int(sys.argv[1])
    gpus = float(sys.argv[2]) if len(sys.argv) > 2 else 0
    dashboard = len(sys.argv) > 3 and sys.argv[3] == "dashboard"
    dashboard_port = free_port()
    # The head's dashboard agent on a port the system picks (0), not Ray's default 52365: a
    # second Ray on the machine whose agent finds that port taken retries for ~3.5 s before it
    # starts without it (the other nodes here get free ports from ray.cluster_utils itself).
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "num_gpus": gpus, "include_dashboard": dashboard,
                                      "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port,
                                      "dashboard_agent_listen_port": 0})
    nodes = [cluster.add_node(num_cpus=1, num_gpus=gpus) for _ in range(workers)]
    cluster.wait_for_nodes()
    print(json.dumps({"address": cluster.address, "head": cluster.head_node.node_id,
                      "workers": [n.node_id for n in nodes],
                      "dashboard": f"http://127.0.0.1:{dashboard_port}" if dashboard else None}), flush=True)
    try:
        for line in sys.stdin:
            command = line.split()
            if command and command[0] == "remove":
                cluster.remove_node(nodes[int(command[1])], allow_graceful=False)
                cluster.wait_for_nodes(timeout=120)  # until the GCS counts one node fewer alive
                print("removed", json.dumps(sorted(cluster.global_state._live_node_ids())), flush=True)
            elif command and command[0] == "add":
                node = cluster.add_node(num_cpus=1, num_gpus=float(command[1]))
                cluster.wait_for_nodes()
                print("added", node.node_id, flush=True)
            elif command and command[0] == "quit":
                break
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
