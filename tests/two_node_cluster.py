"""A real two-node Ray cluster on this machine, in its own process (``ray.cluster_utils.Cluster``, as Ray's tests do).

    python tests/two_node_cluster.py     # prints one JSON line: dashboard URL, GCS address, node ids

Then it waits on stdin: the line ``remove`` removes the second node (a node lost mid-run); end of
input (or the process being killed) shuts the whole cluster down — Ray's reaper kills every process
the nodes started when this process dies, so a test that fails never leaves a cluster behind.
The dashboard (the Jobs API) listens on 127.0.0.1; each node's agents get free ports. The nodes keep
Ray's default node address (this machine's own; tried: with ``node_ip_address=127.0.0.1`` the head's
job agent never registers and every submission times out). The head has the resource
``fedsim_head_node``, the second node ``fedsim_second_node``.
"""

import json
import os
import shutil
import socket
import sys
import tempfile


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_ports() -> dict:
    """Free ports for a node's agents: Ray's fixed defaults (52365…) clash with any other Ray on the machine,
    and a head whose job agent cannot bind refuses every job ("No available agent to submit job")."""
    return {"dashboard_agent_listen_port": free_port(), "metrics_agent_port": free_port(),
            "metrics_export_port": free_port(), "runtime_env_agent_port": free_port()}


def main() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # On a loaded 2-core machine the GCS can stall for a minute; Ray's default (60 s) then ends every process
    # of the cluster that lost contact with it, the job's driver included.
    os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", "300")
    # A temp root of its own: Cluster records its address in <root>/ray/ray_current_cluster, where the job
    # supervisor looks for the cluster to hand its drivers (RAY_ADDRESS). In the shared /tmp/ray it would also
    # be where every later `ray.init()` on this machine looks (the tests' local Ray would join this cluster), and
    # where another Ray's address would send this cluster's jobs to the wrong cluster.
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="fedsim-rc-", dir="/tmp")  # short: Unix socket paths
    from ray.cluster_utils import Cluster

    cpus = int(os.environ.get("FEDSIM_TEST_NODE_CPUS", "2"))
    dashboard_port = free_port()
    common = {"num_cpus": cpus, "object_store_memory": 200 * 1024 * 1024}
    cluster = Cluster(initialize_head=True, head_node_args={
        **common, **agent_ports(), "resources": {"fedsim_head_node": 1}, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port})
    second = cluster.add_node(**common, **agent_ports(), resources={"fedsim_second_node": 1})
    cluster.wait_for_nodes()
    print(json.dumps({
        "dashboard": f"http://127.0.0.1:{dashboard_port}", "gcs": cluster.address,
        "head_node_id": cluster.head_node.node_id, "second_node_id": second.node_id,
    }), flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "remove":
                cluster.remove_node(second, allow_graceful=False)
                print(json.dumps({"removed": second.node_id}), flush=True)
    finally:
        cluster.shutdown()
        shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)


if __name__ == "__main__":
    main()
