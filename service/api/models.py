"""ModelService: a challenger in shadow beside the champion, promoted, rolled back or unloaded
while serving.

A change builds a new runtime (service/api/runtime.py) and puts it in the slot in one step on
the event loop: a call reads its runtime once, so it decides, records and replies with one
champion (and one challenger) whatever happens meanwhile, and no call fails for a swap. A model
no runtime holds any more is closed only after every call that could still hold it has ended
(`ModelControl.retire`). Every artifact is verified against the model team's key before
anything changes; a refused one leaves the models serving as they were. Each change is recorded
before it takes effect: no decision is made with a model the log does not show loaded.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from privscore.v1 import model_service_pb2 as pb
from privscore.v1 import model_service_pb2_grpc
from service.api import validation as check
from service.api.runtime import Runtime, RuntimeSlot
from service.errors import FailedPrecondition
from service.model.scorer import ModelBatcher, Scorer
from service.monitoring.drift import DriftMonitor
from service.monitoring.tracing import stage

_SERVICE = pb.DESCRIPTOR.services_by_name["ModelService"].full_name
LOAD_CHALLENGER_METHOD = f"/{_SERVICE}/LoadChallenger"
PROMOTE_CHALLENGER_METHOD = f"/{_SERVICE}/PromoteChallenger"
ROLLBACK_CHAMPION_METHOD = f"/{_SERVICE}/RollbackChampion"
UNLOAD_CHALLENGER_METHOD = f"/{_SERVICE}/UnloadChallenger"


class ModelRefused(FailedPrecondition):
    reason = "MODEL_REFUSED"


class NoChallenger(FailedPrecondition):
    reason = "NO_CHALLENGER"


class ChallengerChanged(FailedPrecondition):
    reason = "CHALLENGER_CHANGED"


class NoPreviousModel(FailedPrecondition):
    reason = "NO_PREVIOUS_MODEL"


@dataclass(frozen=True)
class ModelControl:
    """What the servicer needs of the server to change models.

    `load(model_dir)` verifies and loads an artifact (ModelRefused, naming the problem, when
    it is not one the model team signed); `retire(model)` closes a model once no call can
    hold it; `drift(model)` is the drift monitor a champion brings (None without a reference);
    `swap(runtime)` puts a runtime in the slot (and follows it with the drift watch)."""

    load: Callable[[Path], Awaitable[ModelBatcher]]
    retire: Callable[[ModelBatcher], None]
    drift: Callable[[ModelBatcher], DriftMonitor | None]
    swap: Callable[[Runtime], None]


def _served(model: ModelBatcher | None, runtime: Runtime) -> pb.ServedModel | None:
    if model is None:
        return None
    scorer = model.scorer
    served = pb.ServedModel(
        model_version=scorer.model_version,
        schema_version=scorer.schema_version,
        manifest_sha256=scorer.manifest_sha256,
    )
    loaded = runtime.loaded_at.get(scorer.manifest_sha256)
    if loaded is not None:
        stamp = timestamp_pb2.Timestamp()
        stamp.FromDatetime(loaded)
        served.loaded_at.CopyFrom(stamp)
    return served


def served_models(runtime: Runtime) -> pb.ServedModels:
    models = pb.ServedModels(champion=_served(runtime.model, runtime))
    for name, model in (("challenger", runtime.challenger), ("previous", runtime.previous)):
        found = _served(model, runtime)
        if found is not None:
            getattr(models, name).CopyFrom(found)
    return models


def shadows(champion: Scorer, challenger: ModelBatcher) -> bool:
    """Whether `challenger` can run in shadow beside `champion`: the same feature schema, or a
    newer one that keeps every input of the champion's (callers move to it while the champion
    still answers: service/api/features.py `request_scorer`)."""
    schema = challenger.scorer.manifest.schema
    return challenger.scorer.schema_version == champion.schema_version or (
        champion.manifest.schema.model_feature_names <= {spec.name for spec in schema.features}
    )


def _recorded(model: ModelBatcher | None) -> dict[str, str] | None:
    if model is None:
        return None
    return {
        "model_version": model.scorer.model_version,
        "model_manifest_sha256": model.scorer.manifest_sha256,
        "schema_version": model.scorer.schema_version,
    }


def _check_request_id(request_id: str) -> None:
    v = check.Violations()
    check.check_request_id(v, "request_id", request_id)
    v.raise_if_any()


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, slot: RuntimeSlot, control: ModelControl) -> None:
        self._slot = slot
        self._control = control
        # One change at a time: each is decided on the runtime the one before left.
        self._changing = asyncio.Lock()

    async def GetModels(
        self,
        request: pb.GetModelsRequest,
        context: grpc.aio.ServicerContext[pb.GetModelsRequest, pb.GetModelsResponse],
    ) -> pb.GetModelsResponse:
        return pb.GetModelsResponse(models=served_models(self._slot.runtime))

    async def _change(
        self, method: str, request_id: str, change: str, after: Runtime, dropped: list[ModelBatcher]
    ) -> tuple[Any, pb.ServedModels]:
        """Record the change (durably), then make it; the models no runtime holds any more
        are retired. Returns (metadata, the models now)."""
        metadata = after.metadata(request_id, after.clock())
        record = after.record(
            method,
            metadata,
            None,
            models={
                "change": change,
                "champion": _recorded(after.model),
                "challenger": _recorded(after.challenger),
                "previous": _recorded(after.previous),
            },
        )
        with stage("audit", records=1):
            metadata.audit_sequence = await after.audit.append(record)
        self._control.swap(after)
        held = {id(m) for m in (after.model, after.challenger, after.previous) if m is not None}
        for model in dropped:
            if id(model) not in held:
                self._control.retire(model)
        return metadata, served_models(after)

    async def LoadChallenger(
        self,
        request: pb.LoadChallengerRequest,
        context: grpc.aio.ServicerContext[pb.LoadChallengerRequest, pb.LoadChallengerResponse],
    ) -> pb.LoadChallengerResponse:
        v = check.Violations()
        check.check_request_id(v, "request_id", request.request_id)
        v.require(
            Path(request.model_dir).is_absolute() and len(request.model_dir) <= 4096,
            "model_dir",
            "must be an absolute path on the server's filesystem",
        )
        v.raise_if_any()
        async with self._changing:
            runtime = self._slot.runtime
            loaded = await self._control.load(Path(request.model_dir))
            champion = runtime.scorer
            if not shadows(champion, loaded):
                loaded.close()
                raise ModelRefused(
                    f"the challenger's feature schema {loaded.scorer.schema_version} lacks "
                    f"inputs of the champion's {champion.schema_version}: a shadow scores the "
                    "rows callers send for the champion, and a newer schema must keep them all"
                )
            after = dataclasses.replace(
                runtime,
                challenger=loaded,
                loaded_at={**runtime.loaded_at, loaded.scorer.manifest_sha256: runtime.clock()},
            )
            dropped = [runtime.challenger] if runtime.challenger is not None else []
            try:
                metadata, models = await self._change(
                    LOAD_CHALLENGER_METHOD, request.request_id, "load", after, dropped
                )
            except BaseException:
                loaded.close()
                raise
        return pb.LoadChallengerResponse(metadata=metadata, models=models)

    async def PromoteChallenger(
        self,
        request: pb.PromoteChallengerRequest,
        context: grpc.aio.ServicerContext[
            pb.PromoteChallengerRequest, pb.PromoteChallengerResponse
        ],
    ) -> pb.PromoteChallengerResponse:
        _check_request_id(request.request_id)
        async with self._changing:
            runtime = self._slot.runtime
            challenger = runtime.challenger
            if challenger is None:
                raise NoChallenger("no challenger is loaded")
            if request.model_version != challenger.scorer.model_version:
                raise ChallengerChanged(
                    f"the challenger is {challenger.scorer.model_version}, not the version "
                    "the request names: promote what GetModels shows"
                )
            after = dataclasses.replace(
                runtime,
                model=challenger,
                challenger=None,
                previous=runtime.model,
                drift=self._control.drift(challenger),
            )
            dropped = [runtime.previous] if runtime.previous is not None else []
            metadata, models = await self._change(
                PROMOTE_CHALLENGER_METHOD, request.request_id, "promote", after, dropped
            )
        return pb.PromoteChallengerResponse(metadata=metadata, models=models)

    async def RollbackChampion(
        self,
        request: pb.RollbackChampionRequest,
        context: grpc.aio.ServicerContext[pb.RollbackChampionRequest, pb.RollbackChampionResponse],
    ) -> pb.RollbackChampionResponse:
        _check_request_id(request.request_id)
        async with self._changing:
            runtime = self._slot.runtime
            previous = runtime.previous
            if previous is None:
                raise NoPreviousModel("no promotion to roll back")
            dropped = [runtime.challenger] if runtime.challenger is not None else []
            # The rolled-back champion goes back to shadow, if it can shadow the one restored.
            back = runtime.model if shadows(previous.scorer, runtime.model) else None
            after = dataclasses.replace(
                runtime,
                model=previous,
                challenger=back,
                previous=None,
                drift=self._control.drift(previous),
            )
            if back is None:
                dropped.append(runtime.model)
            metadata, models = await self._change(
                ROLLBACK_CHAMPION_METHOD, request.request_id, "rollback", after, dropped
            )
        return pb.RollbackChampionResponse(metadata=metadata, models=models)

    async def UnloadChallenger(
        self,
        request: pb.UnloadChallengerRequest,
        context: grpc.aio.ServicerContext[pb.UnloadChallengerRequest, pb.UnloadChallengerResponse],
    ) -> pb.UnloadChallengerResponse:
        _check_request_id(request.request_id)
        async with self._changing:
            runtime = self._slot.runtime
            if runtime.challenger is None:
                raise NoChallenger("no challenger is loaded")
            after = dataclasses.replace(runtime, challenger=None)
            metadata, models = await self._change(
                UNLOAD_CHALLENGER_METHOD, request.request_id, "unload", after, [runtime.challenger]
            )
        return pb.UnloadChallengerResponse(metadata=metadata, models=models)
