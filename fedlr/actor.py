"""The client actor of ``fedlr run`` (Ray side; the backend that drives it: :mod:`fedlr.raypool`).

Kept apart from the backend so that a Ray worker, which imports this module to
build the actor, loads only Ray, ``flwr.app`` and ``flwr.clientapp``: Flower's
``ClientAppActor`` lives in ``flwr.simulation``, whose import pulls in the
SuperLink's web and database stack (FastAPI, SQLAlchemy, Alembic), ≈ 45 MB and
0.6 s per actor that a client never uses.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import ray
from flwr.app import Context, Message
from flwr.clientapp.client_app import ClientApp, ClientAppException, LoadClientAppError

from fedlr.arrays import install as fast_arrays


def lean_serialization() -> bool:
    """Register Ray's serializers for pyarrow, pydantic and starlette objects only
    when those libraries are already loaded.

    Every Ray process imports all three when it creates its serialization
    context (``ray.util.serialization_addons.apply``), for Ray Data and Serve:
    ≈ 70 MB in each client actor, ≈ 40 MB (pyarrow) in the driver, and fedlr
    sends none of their objects. A process that does load them (a hub dataset
    in the driver) registers them as before. Returns whether Ray matched.
    """
    try:
        from ray.util import serialization_addons
    except ImportError:
        return False
    if getattr(serialization_addons.apply, "__fedlr_lean__", False):
        return True
    needed = ("register_starlette_serializer",)
    if not all(hasattr(serialization_addons, name) for name in needed):
        return False

    def apply(context: Any) -> None:
        if "pydantic" in sys.modules:
            from ray._common.pydantic_compat import register_pydantic_serializers

            register_pydantic_serializers(context)
        if "starlette" in sys.modules:
            serialization_addons.register_starlette_serializer(context)
        if "pyarrow" in sys.modules:
            from ray._private.arrow_serialization import _register_custom_datasets_serializers

            _register_custom_datasets_serializers(context)

    apply.__fedlr_lean__ = True  # type: ignore[attr-defined]
    serialization_addons.apply = apply
    return True


# A Ray worker imports this module to build the actor, before it deserializes the
# actor's arguments (which creates its serialization context) and any message.
lean_serialization()
fast_arrays()


class ClientActor:
    """A Flower client actor that is ready before its first message (Ray class: :data:`FedlrClientActor`).

    It runs a message through the ClientApp exactly as Flower's
    ``ClientAppActor.run`` does (same exceptions, so the simulation engine turns
    failures into the same error replies), but:

    * ``cfg`` (the resolved fedlr config) makes it import the method's trainer,
      set torch's threads to its CPU share and load the dataset cache when it
      is created (:func:`clients.trainer.warm`); ``None`` leaves that to the first
      message, as Flower's actor does;
    * it receives the ClientApp loader once (:meth:`set_app`) instead of with
      every message.
    """

    def __init__(self, cfg: dict[str, Any] | None = None) -> None:
        self._app_fn: Callable[[], ClientApp] | None = None
        if cfg is not None:
            from clients.trainer import warm

            warm(cfg)

    def ready(self) -> int:
        """The actor's process id, once it is constructed."""
        return os.getpid()

    def set_app(self, app_fn: Callable[[], ClientApp]) -> None:
        """Keep the ClientApp loader for every later message."""
        self._app_fn = app_fn

    def run(self, message: Message, cid: str, context: Context) -> tuple[str, Message, Context]:
        """Pass ``message`` through the ClientApp; return the reply and the updated Context."""
        if self._app_fn is None:
            raise LoadClientAppError("FedlrClientActor.run before set_app")
        try:
            app = self._app_fn()
            out_message = app(message=message, context=context)
        except LoadClientAppError:
            raise
        except Exception as ex:
            raise ClientAppException(str(ex)) from ex
        return cid, out_message, context

    def run_call(self, jobs: list[tuple[Message, str, Context]]) -> Iterator[tuple[str, Message, Context]]:
        """:meth:`run` for each ``(message, cid, context)`` in turn, yielding each
        result as soon as it is ready (a Ray streaming generator: the driver gets
        every reply while the next client trains). The first failure ends the
        call with that client's exception, as :meth:`run` raises it; the caller
        sends the rest again (:meth:`fedlr.raypool.FedlrRayBackend.process_call`)."""
        for message, cid, context in jobs:
            yield self.run(message, cid, context)

    def terminate(self) -> None:
        ray.actor.exit_actor()


FedlrClientActor = ray.remote(ClientActor)
