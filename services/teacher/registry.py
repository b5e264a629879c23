"""The teacher's models: load beside the one serving, warm up, swap atomically, drain, free.

Requests take the active model when they are admitted and hold it until they
are answered (``in_flight``), so a swap never pulls a model out from under a
request: the old model drains, then is freed. A load that fails leaves the
active model as it was. Models load only from allowed directories or hub ids: a
local source is resolved once, under the admin lock, and the real place that was
checked is the place loaded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from client.fingerprint import fingerprint_of
from client.prompts import ChatRenderer
from client.protocol import (
    LABELS,
    LoadModelRequest,
    ModelInfo,
    ModelRef,
    ModelState,
    TokenizerFingerprint,
)
from services.teacher.backends.base import JudgeItem, ScoreItem, TeacherBackend

log = logging.getLogger(__name__)


class ModelRefused(Exception):
    """The request names a model the policy does not allow (403) or that is unusable (422)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class NoModel(Exception):
    pass


@dataclass(eq=False)
class LoadedModel:
    name: str
    source: str
    revision: str
    backend: TeacherBackend
    renderer: ChatRenderer
    label_ids: list[int]  # in the order of LABELS
    fingerprint: TokenizerFingerprint  # hashing a vocabulary is not free: once, at load
    state: ModelState = "serving"
    in_flight: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ref(self) -> ModelRef:
        return ModelRef(name=self.name, revision=self.revision)

    def info(self, active: bool, public: bool = False) -> ModelInfo:
        """What GET /v1/models says of it; ``public``: a local source by its folder's name only."""
        source = self.source
        if public and Path(source).is_absolute():  # local sources are resolved, hub ids never are
            source = Path(source).name
        return ModelInfo(
            name=self.name,
            revision=self.revision,
            source=source,
            backend=self.backend.kind,
            state=self.state,
            active=active,
            fingerprint=self.fingerprint,
            device=self.backend.device,
            dtype=self.backend.dtype,
        )


BackendFactory = Callable[[LoadModelRequest], TeacherBackend]


def default_backend_factory(
    request: LoadModelRequest, trust_remote_code: bool = False, device: str = "auto"
) -> TeacherBackend:
    if request.backend == "vllm":
        from services.teacher.backends.vllm import VLLMBackend

        return VLLMBackend(
            request.source,
            revision=request.revision,
            dtype=request.dtype,
            trust_remote_code=trust_remote_code and request.trust_remote_code,
        )
    from services.teacher.backends.hf import TransformersBackend

    return TransformersBackend(
        request.source,
        revision=request.revision,
        gguf_file=request.gguf_file,
        dtype=request.dtype,
        device=device,
        trust_remote_code=trust_remote_code and request.trust_remote_code,
    )


class SourcePolicy:
    """Which model sources may be loaded: files under allowed roots, or listed hub ids."""

    def __init__(self, allowed_roots: list[str], allowed_ids: list[str]) -> None:
        self.roots = [Path(root).resolve() for root in allowed_roots]
        self.ids = set(allowed_ids)

    def allow_root(self, root: str | Path) -> None:
        self.roots.append(Path(root).resolve())

    def place(self, request: LoadModelRequest, check: bool = True) -> LoadModelRequest:
        """The request to load: a local source (and its gguf_file) resolved to its real
        place, which is what is checked (``check``) and then loaded; a hub id as given.

        Raises ModelRefused: 403 outside the allowed roots or ids, 404 when the file
        system cannot tell where the source is (a name too long, a symlink loop).
        """
        resolved = _resolve(request.source)
        if resolved is None:
            if check and request.source not in self.ids:
                raise ModelRefused(403, f"hub id {request.source!r} is not in the allowed ids")
            return request
        if check and not any(resolved.is_relative_to(root) for root in self.roots):
            raise ModelRefused(403, f"{request.source!r} is outside the allowed model roots")
        update = {"source": str(resolved)}
        if request.gguf_file is not None:
            gguf = _resolve(str(resolved / request.gguf_file))
            if gguf is None or not gguf.is_relative_to(resolved):
                raise ModelRefused(403, f"gguf_file {request.gguf_file!r} leaves the model folder")
            update["gguf_file"] = str(gguf.relative_to(resolved))
        return request.model_copy(update=update)


def _resolve(source: str) -> Path | None:
    """The real place of a local source ("..", symlinks followed), None for a hub id."""
    path = Path(source)
    try:
        if path.is_absolute() or source.startswith(".") or path.exists():
            return path.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ModelRefused(404, f"cannot find the model source {source!r}: {reason}") from exc
    return None


def revision_of(request: LoadModelRequest) -> str:
    if request.revision:
        return request.revision
    from services.teacher.backends.hf import local_revision

    path = Path(request.source)
    if request.gguf_file:
        path = path / request.gguf_file
    return local_revision(path) or "main"


def warm_up(model: LoadedModel) -> None:
    """One small score and judge call, so the first real request pays no start-up cost."""
    ids = model.renderer.prompt("warm up", [], "look", ["look"])
    model.backend.score([ScoreItem(ids, [(len(ids) - 1, len(ids))])], top_k=1)
    model.backend.label_probs([JudgeItem(ids)], model.label_ids)


class ModelRegistry:
    def __init__(self, policy: SourcePolicy, factory: BackendFactory) -> None:
        self.policy = policy
        self.factory = factory
        self.models: dict[str, LoadedModel] = {}
        self.active: LoadedModel | None = None
        self._admin = asyncio.Lock()  # one load / swap / unload at a time

    # ------------------------------------------------------------------ requests

    def acquire(self) -> LoadedModel:
        """The active model, held until release(); NoModel when none serves."""
        model = self.active
        if model is None:
            raise NoModel("no teacher model is loaded")
        model.in_flight += 1
        return model

    def release(self, model: LoadedModel) -> None:
        model.in_flight -= 1
        if model.in_flight == 0 and model.state == "draining":
            model.drained.set()

    # ------------------------------------------------------------------ admin

    def infos(self, public: bool = False) -> list[ModelInfo]:
        return [m.info(active=m is self.active, public=public) for m in self.models.values()]

    async def load(self, request: LoadModelRequest, check_policy: bool = True) -> ModelInfo:
        """Load (and warm) a model beside the active one; swap to it if asked.

        The source is resolved and checked under the admin lock, and loaded from the
        resolved place: a symlink re-pointed meanwhile cannot lead outside the roots.
        """
        async with self._admin:
            if request.name in self.models:
                raise ModelRefused(409, f"a model named {request.name!r} is already loaded")
            request = self.policy.place(request, check=check_policy)
            start = time.perf_counter()
            model = await asyncio.to_thread(self._build, request)
            log.info(
                "loaded %s (%s) in %.1fs", request.name, model.revision, time.perf_counter() - start
            )
            self.models[model.name] = model
            if request.activate or self.active is None:
                await self._switch(model)
            return model.info(active=model is self.active)

    def _build(self, request: LoadModelRequest) -> LoadedModel:
        try:
            backend = self.factory(request)
        except Exception as exc:
            raise ModelRefused(422, f"could not load {request.source!r}: {exc}") from exc
        try:
            renderer = ChatRenderer(backend.tokenizer)
            labels = renderer.label_ids()
            model = LoadedModel(
                name=request.name,
                source=request.source,
                revision=revision_of(request),
                backend=backend,
                renderer=renderer,
                label_ids=[labels[label] for label in LABELS],
                fingerprint=fingerprint_of(backend.tokenizer),
                state="warming",
            )
            warm_up(model)
            model.state = "ready"
        except Exception as exc:
            backend.close()
            raise ModelRefused(422, f"{request.source!r} cannot serve as a teacher: {exc}") from exc
        return model

    async def swap(self, name: str) -> ModelInfo:
        async with self._admin:
            model = self.models.get(name)
            if model is None:
                raise KeyError(name)
            await self._switch(model)
            return model.info(active=True)

    async def _switch(self, model: LoadedModel) -> None:
        old, self.active = self.active, model  # atomic for every request admitted after this
        model.state = "serving"
        model.drained.clear()
        if old is not None and old is not model:
            old.state = "draining"
            asyncio.create_task(self._retire(old))

    async def _retire(self, model: LoadedModel) -> None:
        """Wait for the old model's in-flight requests, then free it."""
        if model.in_flight > 0:
            await model.drained.wait()
        if model.state == "draining":  # not swapped back in meanwhile
            model.state = "unloaded"
            self.models.pop(model.name, None)
            await asyncio.to_thread(model.backend.close)
            log.info("unloaded %s (%s)", model.name, model.revision)

    async def unload(self, name: str) -> None:
        async with self._admin:
            model = self.models.get(name)
            if model is None:
                raise KeyError(name)
            if model is self.active:
                raise ModelRefused(409, f"{name!r} is serving; swap to another model first")
            model.state = "draining"
            await self._retire(model)

    async def close(self) -> None:
        for model in list(self.models.values()):
            model.state = "unloaded"
            await asyncio.to_thread(model.backend.close)
        self.models.clear()
        self.active = None
