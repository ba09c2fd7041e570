"""The API's view of the machine: a model's plan against the GPUs, the GPUs and their history, the
rpc-servers this host lends (and peers' claims on them), and the peers this daemon reads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response
from pydantic import TypeAdapter

from launcher.api.access import Access
from launcher.api.answers import Authorization, InstanceName, errors, json_answer
from launcher.api.disconnect import unless_gone
from launcher.api.redact import redacted_plan
from launcher.errors import NotFoundError
from launcher.gpu.sampler import Sampler
from launcher.rpc.peers import Peers
from launcher.schema_gpus import GpuSample
from launcher.schema_plans import Plan
from launcher.schema_rpc import ClaimRequest, PeerStatus, RpcClaim, RpcReport
from launcher.supervise.lending import Lending
from launcher.supervise.manager import Manager
from launcher.supervise.table import InstanceView


def machine_routes(
    manager: Manager,
    instances: Mapping[str, InstanceView],
    sampler: Sampler,
    lending: Lending,
    peer_reader: Peers | None,
    access: Access,
) -> APIRouter:
    routes = APIRouter()
    samples_json = TypeAdapter(list[GpuSample])

    @routes.get("/plan/{name}", response_model=Plan, responses={**access.read, **errors(404, 422, 503)})
    async def plan(
        name: InstanceName, request: Request, authorization: Authorization = None, estimate: bool = False
    ) -> Response:
        """What `launcher plan NAME` shows: GPUs, MiB per GPU by term, split, command line, environment (the
        configured environment's values and keys in the command line only with the token). ``estimate``:
        from the model's header alone, whatever earlier runs measured (`launcher plan --estimate`)."""
        made = await unless_gone(request, manager.plan(name, estimate))
        shown_plan = made if access.holds_token(authorization) else redacted_plan(made, instances[name].settings.env)
        return json_answer(shown_plan.model_dump_json())

    @routes.get("/gpus", response_model=list[GpuSample], responses=access.read)
    async def gpus() -> Response:
        return json_answer(samples_json.dump_json(manager.gpu_samples()))

    @routes.get("/gpus/{index}/history", response_model=list[GpuSample], responses={**access.read, **errors(404, 422)})
    async def gpu_history(index: int, limit: Annotated[int, Query(ge=1, le=100_000)] = 600) -> Response:
        if not 0 <= index < len(sampler.identities):
            raise NotFoundError(f"no GPU {index}", hint=f"{len(sampler.identities)} GPUs are seen")
        return json_answer(samples_json.dump_json(sampler.history(index)[-limit:]))

    @routes.get("/rpc", response_model=RpcReport, responses=access.read)
    async def rpc() -> Response:
        """This host's ready rpc-servers: the endpoint for `llama-server --rpc`, the GPUs each lends with
        their free MiB, who is connected, and the claims peers registered on them."""
        return json_answer(lending.report().model_dump_json())

    claims_json, peers_json = TypeAdapter(list[RpcClaim]), TypeAdapter(list[PeerStatus])
    acting = access.refused(404, 409, 422)

    @routes.post(
        "/rpc/claims",
        response_model=list[RpcClaim],
        dependencies=[Depends(access.authorised)],
        responses={**acting, **errors(400)},
    )
    async def claim(request: ClaimRequest) -> Response:
        """Take or renew a peer's claim on one rpc-server's GPUs for ``ttl_s`` seconds (a lease: renew it
        before then); the claims on that endpoint after. 409 when another holds the endpoint (it serves one
        llama-server at a time) or the MiB are not there."""
        return json_answer(claims_json.dump_json(lending.claim(request)))

    @routes.delete(
        "/rpc/claims/{holder:path}", status_code=204, dependencies=[Depends(access.authorised)], responses=acting
    )
    async def release(holder: Annotated[str, Path(description="the holder the claim was taken for")]) -> Response:
        """Release ``holder``'s claim (already gone is fine: it may have lapsed)."""
        lending.release(holder)
        return Response(status_code=204)

    @routes.get("/peers", response_model=list[PeerStatus], responses=access.read)
    async def peers() -> Response:
        """What this daemon last read of each peer's `GET /rpc`, and whether it answers."""
        statuses = peer_reader.statuses() if peer_reader is not None else []
        return json_answer(peers_json.dump_json(statuses))

    return routes
