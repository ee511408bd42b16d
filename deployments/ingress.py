"""The ingress deployment: Flashtile's HTTP API (deployments/http.py) and Python handle API over the stage
deployments. It runs the pipeline (stages/driver.py) on Serve handles; no pixels come here: stage replicas pass
them to each other by reference, and the ingress receives only the encoded file."""

import logging

from ray import serve
from ray.serve.handle import DeploymentHandle

from pydantic import ValidationError

from deployments import metrics
from deployments.errors import InvalidRequest, classify
from deployments.executor import ServeExecutor, StageHandles
from deployments.guard import Guard
from deployments.http import create_app
from deployments.idempotency import Outputs
from deployments.regions import InRegion, Regions, census, node_region
from deployments.schemas import GenerateRequest, GenerateResult, error_text
from deployments.service import Service
from deployments.storage import OutputStore

log = logging.getLogger("ray.serve")


@serve.deployment(name="ingress")
@serve.ingress()
class Ingress(InRegion):
    def __init__(self, *, encoder: DeploymentHandle, generator: DeploymentHandle, upscaler: DeploymentHandle,
                 refiner: DeploymentHandle, compositor: DeploymentHandle, output: str | None = None,
                 url_ttl_s: int = 900, guard: dict, regions: list[str] | None = None,
                 region_floors: dict[str, int] | None = None):
        metrics.get()  # from the start: its heartbeat shows in every export round
        stages = StageHandles(encoder, generator, upscaler, refiner, compositor)
        guard = Guard.from_args(guard)
        app = serve.get_replica_context().app_name
        where = Regions(None if regions is None else tuple(regions), node_region(), region_floors or {},
                        lambda: census(app))
        self._service = Service(lambda region: ServeExecutor(stages, region), guard,
                                Outputs(OutputStore.from_location(output), url_ttl_s), where)
        if len(guard.keys):
            log.info("Flashtile: %d API key(s) configured; inference routes need 'Authorization: Bearer <key>'",
                     len(guard.keys))
        else:
            log.warning("Flashtile: no API keys configured (FLASHTILE_API_KEYS or api_keys): serving loopback clients "
                        "only; every other client gets 403")

    def __serve_build_asgi_app__(self):
        return create_app(self._service)

    async def generate(self, request: GenerateRequest | dict, region: str | None = None) -> GenerateResult:
        """Python API (through serve.get_app_handle("flashtile")): one request in, the typed result out. `region`:
        where to serve it (Serve's region router reads it for this very call too); default this replica's.

        The same limits, policy, capacity and deadline as HTTP; a refusal raises the same typed error
        (deployments/errors.py: LimitExceeded, PolicyViolation, Overloaded, Timeout, ...) the HTTP routes map.
        """
        try:
            if isinstance(request, dict):
                request = GenerateRequest.model_validate(request)
            return (await self._service.generate(request, region=self._service.regions.resolve(region)))[0]
        except ValidationError as err:
            raise InvalidRequest(error_text(err)) from None
        except Exception as err:
            raise classify(err, self._service.guard.retry_after_s) from None
