"""A real multi-node Ray cluster on this one host, one node per region, running Flashtile placed for those regions:
for tests/test_regions.py and `python -m bench regions`.

`ray.cluster_utils.Cluster`: a head that runs no replicas (num_cpus 0; the Serve controller, the one HTTP proxy,
the dashboard on 127.0.0.1) and one node per region labelled with Ray's own `ray.io/availability-region`, each with
just the CPUs its region's replicas reserve, so a lost region's replicas wait for their region rather than crowd
another. Flashtile goes on with `serve deploy`, from cluster.yaml passed through deployments.regions.place().
"""

import math
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests
import yaml

from deployments.regions import REGION_LABEL, place

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(port: int, regions: list[str], args: dict | None = None) -> dict:
    """cluster.yaml for two regions, one replica of each deployment per region and no more (autoscaling would
    blur what the tests look at), the proxy on the head only (one HTTP port on one host)."""
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["proxy_location"] = "HeadOnly"
    config["http_options"].update(host="127.0.0.1", port=port)
    app = config["applications"][0]
    app["args"].update(regions=regions, max_in_flight=64, **(args or {}))
    for d in app["deployments"]:
        d["autoscaling_config"].update(min_replicas=1, max_replicas=len(regions))  # place() raises min to the floor
    return place(config)


class Regional:
    """The running cluster: its Ray nodes per region, HTTP URL and metrics ports. `args`: app args over
    cluster.yaml's; the output store (a directory every node of this host shares) is `tmp`/outputs."""

    def __init__(self, tmp: Path, regions: list[str], args: dict | None = None):
        import ray
        from ray.cluster_utils import Cluster

        self.dashboard_port, self.http_port = free_port(), free_port()
        self.outputs = tmp / "outputs"
        serve_config = config(self.http_port, regions, {"output": str(self.outputs), **(args or {})})
        # A region's node has the CPUs its replicas reserve (Ray's logical CPUs; they share this host's cores).
        deployments = serve_config["applications"][0]["deployments"]
        reserved = sum(d["ray_actor_options"]["num_cpus"] * d["autoscaling_config"]["min_replicas"] for d in deployments)
        self.region_cpus = math.ceil(round(reserved / len(regions), 6))  # Ray counts a node's CPUs whole
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": True,
            "dashboard_host": "127.0.0.1", "dashboard_port": self.dashboard_port})
        self.metrics_ports: dict[str, int] = {}
        self.url = f"http://127.0.0.1:{self.http_port}"
        try:
            self.nodes = {region: self.add(region) for region in regions}
            ray.init(address=self.cluster.address, namespace="serve", logging_level="ERROR")
            tmp.mkdir(parents=True, exist_ok=True)
            path = tmp / "regions.yaml"
            path.write_text(yaml.safe_dump(serve_config, sort_keys=False))
            subprocess.run([str(Path(sys.executable).parent / "serve"), "deploy", str(path),
                            "-a", f"http://127.0.0.1:{self.dashboard_port}"], check=True, capture_output=True, timeout=120)
            self.wait_until(self.all_placed, "every region has its replicas")
        except BaseException:
            self.close()
            raise

    def wait_until(self, ready, what: str, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert time.monotonic() < deadline, f"not yet after {timeout_s} s: {what}"
            time.sleep(2)

    def add(self, region: str):
        """Start a node of this region (again, after `lose`)."""
        self.metrics_ports[region] = free_port()
        node = self.cluster.add_node(num_cpus=self.region_cpus, labels={REGION_LABEL: region},
                                     metrics_export_port=self.metrics_ports[region])
        if hasattr(self, "nodes"):
            self.nodes[region] = node
        return node

    def lose(self, region: str) -> None:
        """Every node of the region gone at once, its processes killed (no graceful drain)."""
        self.cluster.remove_node(self.nodes.pop(region), allow_graceful=False)

    def regions(self) -> dict:
        return requests.get(f"{self.url}/v1/regions", timeout=30).json()

    def all_placed(self) -> bool:
        """Serve calls the application running (every replica initialized: routers know them) and every region
        holds its floor of each deployment."""
        from ray import serve

        app = serve.status().applications.get("flashtile")
        if app is None or app.status != "RUNNING":
            return False
        try:
            return all(r["serving"] for r in self.regions()["data"])
        except (requests.RequestException, ValueError, KeyError):
            return False

    def samples(self, region: str, metric: str) -> list[tuple[dict, float]]:
        """(labels, value) of each sample of `metric` (a Flashtile counter) that this region's node exports."""
        text = requests.get(f"http://127.0.0.1:{self.metrics_ports[region]}/metrics", timeout=10).text
        return [(dict(re.findall(r'(\w+)="([^"]*)"', line)), float(line.rsplit(" ", 1)[1]))
                for line in text.splitlines() if line.startswith(f"ray_{metric}{{")]

    def calls(self, region: str) -> dict[tuple, float]:
        """flashtile_region_requests_total as this region's node exports it: {(stage, origin, served): calls}."""
        out: dict[tuple, float] = {}
        for labels, value in self.samples(region, "flashtile_region_requests_total"):
            key = (labels["stage"], labels["origin"], labels["served"])
            out[key] = out.get(key, 0.0) + value
        return out

    def spills(self, region: str) -> float:
        """flashtile_region_spills_total of this region's node: calls it served for other regions."""
        return sum(value for _, value in self.samples(region, "flashtile_region_spills_total"))

    def close(self) -> None:
        import ray
        from ray import serve

        if ray.is_initialized():
            serve.shutdown()  # also forgets this cluster's Serve controller, so a next cluster gets its own
        ray.shutdown()
        self.cluster.shutdown()
