"""Regions: where replicas run and which replicas a request goes to, with Ray's own machinery.

- A node's region is Ray's own node label `ray.io/availability-region` (set from $RAY_NODE_REGION when the node
  starts; KubeRay pods set it from the node's `topology.kubernetes.io/region`).
- Placement: `place(config)` gives every deployment of an application with `regions` a label selector on those
  regions and a replica floor of `region_floors[stage]` per region (min_replicas = floor x regions). Serve spreads
  a deployment's replicas over the nodes its selector allows (docs/operations.md#regions says what that holds).
- Routing: `RegionRouter`, the request router of every deployment, at every hop (proxy -> ingress -> each stage
  call, tiles included). Replicas report their region once, at start (`record_replica_metadata`); a call names
  its request's region with the keyword `region`. The router offers Serve the request's own region's replicas
  first and then the other regions', least loaded first: Serve takes the first replica with room, so a request
  stays home while its region has capacity and spills when the region is saturated or gone.
"""

import asyncio
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from deployments.errors import InvalidRequest

REGION_LABEL = "ray.io/availability-region"  # Ray's own key; $RAY_NODE_REGION sets it
REGION_ENV = "RAY_NODE_REGION"
HEADER = "X-Flashtile-Region"
ROUTER = "deployments.regions:RegionRouter"
DEPLOYMENTS = ("ingress", "prompt_encoder", "base_generator", "upscaler", "refiner", "compositor")
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a Kubernetes label value, lower case


def check_regions(regions: list[str] | None) -> list[str] | None:
    """The region list as given, or ValueError naming what is wrong with it (None: regions off)."""
    if regions is None:
        return None
    if not regions:
        raise ValueError("regions: must name at least one region (or be null: no regions)")
    for name in regions:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"regions: {name!r} is not a region name (lower-case letters, digits and '-', at most "
                             "63, as a Kubernetes label value)")
    seen = [name for i, name in enumerate(regions) if name in regions[:i]]
    if seen:
        raise ValueError(f"regions: {seen[0]!r} is listed twice in {regions}")
    return regions


def check_floors(floors: dict[str, int]) -> dict[str, int]:
    for stage, floor in floors.items():
        if stage not in DEPLOYMENTS:
            raise ValueError(f"region_floors: {stage!r} is not a deployment; allowed: {', '.join(DEPLOYMENTS)}")
        if not isinstance(floor, int) or floor < 0:
            raise ValueError(f"region_floors.{stage}: must be a whole number >= 0; got {floor!r}")
    return floors


def selector(regions: list[str]) -> dict[str, str]:
    """The label selector of a deployment that runs in these regions (Ray's `in(...)` syntax)."""
    return {REGION_LABEL: f"in({','.join(regions)})"}


def place(config: dict) -> dict:
    """A Serve config with every region-enabled Flashtile application placed: each of its six deployments gets
    the regions' label selector, the region router and min_replicas = its floor x regions (the config's own
    min_replicas when larger). Raises ValueError naming the deployment when its max_replicas is below that.
    Applications without `regions` are left as they are; placing twice changes nothing."""
    for app in config.get("applications") or []:
        args = app.get("args") or {}
        if app.get("import_path") != "deployments.app:build_app" or args.get("regions") is None:
            continue
        regions = check_regions(args["regions"])
        floors = check_floors(args.get("region_floors") or {})
        by_name = {d.get("name"): d for d in app.setdefault("deployments", [])}
        for name in DEPLOYMENTS:
            d = by_name.get(name)
            if d is None:
                d = {"name": name}
                app["deployments"].append(d)
            d.setdefault("ray_actor_options", {})["label_selector"] = selector(regions)
            d["request_router_config"] = {"request_router_class": ROUTER}
            per_region = floors.get(name, 1)
            floor = per_region * len(regions)
            auto = d.get("autoscaling_config")
            if auto is None:
                replicas = d.get("num_replicas", 1)
                if replicas != "auto" and replicas < floor:
                    raise ValueError(f"{name}: num_replicas ({replicas}) is below its floor of {per_region} "
                                     f"per region x {len(regions)} regions ({floor})")
                continue
            top = auto.get("max_replicas", 1)
            if floor > top:
                raise ValueError(f"{name}: region_floors.{name} ({per_region}) x {len(regions)} regions = "
                                 f"{floor} replicas, above its max_replicas ({top})")
            auto["min_replicas"] = max(auto.get("min_replicas", 1), floor)
    return config


def node_region() -> str | None:
    """The region of the node this process runs on (None off a Ray worker, or on a node without one)."""
    try:
        labels = ray.get_runtime_context().get_node_labels()
    except Exception:  # not connected to Ray: a unit test, the CLI
        return None
    return labels.get(REGION_LABEL) or None


class InRegion:
    """A deployment whose replicas tell the routers which region they run in (once: a replica never moves)."""

    def record_replica_metadata(self) -> dict:
        return {"region": node_region()}


class RegionRouter(FIFOMixin, RequestRouter):
    """Serve's request router for Flashtile's deployments: the request's own region first, then the others.

    The request's region is the call's `region` keyword (the ingress passes the one it resolved from the
    X-Flashtile-Region header; a Python handle caller may pass one), else this router's own node's region (the
    proxy that received the request, or the ingress that makes the call). Each rank goes to Serve, which picks
    the least loaded replica of the first rank with room, probing queue lengths as for its default router.
    """

    def initialize_state(self, **kwargs) -> None:
        self._home = node_region()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        origin = (pending_request.kwargs.get("region") if pending_request is not None else None) or self._home
        if pending_request is not None:
            # Every rank is offered in this one pass: when none has room, Serve waits (backs off) before the next.
            pending_request.routing_context.should_backoff = True
        return rank(candidate_replicas, origin, lambda r: self.replica_queue_len_cache.get(r.replica_id) or 0)


def rank(replicas: list, origin: str | None, queue_len: Callable) -> list[list]:
    """Replicas in the order to try them: the origin region's, then each other region's, the least loaded region
    (requests in flight over capacity, as last seen; a replica not seen yet counts as idle) first."""
    by_region: dict[str | None, list] = defaultdict(list)
    for replica in replicas:
        by_region[replica.replica_metadata.get("region")].append(replica)
    home = by_region.pop(origin, []) if origin is not None else []
    load = lambda group: sum(map(queue_len, group)) / max(1, sum(r.max_ongoing_requests for r in group))  # noqa: E731
    others = sorted(by_region.values(), key=load)
    return [home, *others] if home else others


@dataclass(frozen=True)
class Regions:
    """The regions as the ingress sees them: the configured names (None: regions off), its own, each deployment's
    floor per region, and how to count live replicas (`census`)."""

    names: tuple[str, ...] | None = None
    home: str | None = None
    floors: dict[str, int] = field(default_factory=dict)
    census: Callable[[], dict[str, dict[str, int]]] | None = None

    def resolve(self, asked: str | None) -> str | None:
        """A request's region: the one it asked for (header or handle keyword), else the ingress's own. An unknown
        one is refused before any work, naming the configured regions."""
        if self.names is None:
            if asked is not None:
                raise InvalidRequest(f"{HEADER}: this cluster has no regions configured; got {asked!r}", field=HEADER)
            return None
        if asked is None:
            return self.home or self.names[0]
        if asked not in self.names:
            raise InvalidRequest(f"{HEADER}: unknown region {asked!r}; configured regions: {', '.join(self.names)}",
                                 field=HEADER)
        return asked

    def served(self, seen: dict[str, set[str]]) -> dict[str, list[str]]:
        """The result's `regions`: per stage, the regions whose replicas served it (the ingress: this one)."""
        if self.names is None:
            return {}
        return {"ingress": [self.home or "none"], **{stage: sorted(where) for stage, where in seen.items()}}

    async def status(self) -> dict:
        """GET /v1/regions: each configured region with its live replicas per deployment and the deployments
        below their floor there."""
        live = await asyncio.to_thread(self.census) if self.census and self.names else {}
        regions = []
        for name in self.names or ():
            replicas = {d: live.get(name, {}).get(d, 0) for d in DEPLOYMENTS}
            below = [d for d in DEPLOYMENTS if replicas[d] < self.floors.get(d, 1)]
            regions.append({"name": name, "replicas": replicas, "below_floor": below, "serving": not below})
        return {"object": "list", "home": self.home, "data": regions}


def census(app: str) -> dict[str, dict[str, int]]:
    """Live replicas of an application per region and deployment, from Ray's state API and node labels."""
    from ray.util.state import list_actors

    region_of = {n["NodeID"]: (n.get("Labels") or {}).get(REGION_LABEL) for n in ray.nodes() if n.get("Alive")}
    counts: dict[str, Counter] = defaultdict(Counter)
    prefix = f"SERVE_REPLICA::{app}#"
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False):
        if actor.name and actor.name.startswith(prefix) and region_of.get(actor.node_id):
            counts[region_of[actor.node_id]][actor.name[len(prefix):].split("#")[0]] += 1
    return {region: dict(c) for region, c in counts.items()}
