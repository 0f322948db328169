"""The Ray side of ``fedlr run``: an early, lean Ray start, warm client actors, and
the Flower backend that uses them.

Flower's Ray backend (``flwr.server.superlink.fleet.vce.backend.raybackend``)
starts Ray and its actors only when the simulation engine's thread gets to it,
after the driver has imported everything; each actor then imports torch and
Flower on its first message; every message pickles the ClientApp loader along
with the message; Measured with ``fedlr bench``,
those were the bulk of fedlr's overhead against a plain PyTorch loop. Here:

* :mod:`fedlr.raystart` starts a lean Ray and creates the client actors in a
  background thread as soon as the data cache and the preflight checks are
  done, so Ray's daemons and the actors' imports run while the driver imports
  Flower and torch.
* :class:`fedlr.actor.FedlrClientActor` imports the method's client code, sets
  torch's threads to its CPU share and loads the dataset cache when it is
  created, and receives the ClientApp loader once.

One call per actor at a time, as in Flower, but a call carries several clients
(:func:`fedlr.engine.plan_calls`), run back to back in the actor and streamed
back one reply at a time (:meth:`FedlrRayBackend.process_call`). Queueing a
second one-message call behind the running one (tried) did not shorten rounds:
it kept every call's Ray overhead and only overlapped it.

Everything falls back to Flower's own behaviour when a piece does not apply
(no warm actors, a different Ray): slower, never different results.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import ray
from flwr.app import Context, Message
from flwr.clientapp.client_app import ClientApp
from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
from flwr.simulation.ray_transport.ray_actor import BasicActorPool

from fedlr.actor import FedlrClientActor


_START: Any = None  # the fedlr.raystart.RayStart of the run in progress


def install(start: Any) -> None:
    """Make :class:`FedlrRayBackend` take its Ray and actors from ``start``."""
    global _START
    _START = start


class FedlrRayBackend(RayBackend):
    """Flower's Ray backend with warm actors and a once-per-actor ClientApp (module docstring)."""

    def init_ray(self, backend_config: Any) -> None:
        if _START is not None:
            _START.wait()
        if not ray.is_initialized():
            super().init_ray(backend_config)

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        pool = BasicActorPool(actor_type=FedlrClientActor, client_resources=self.client_resources, actor_kwargs={})
        actors = _START.take_actors() if _START is not None else []
        actors += [pool.create_actor_fn() for _ in range(max(pool.actors_capacity - len(actors), 0))]
        for actor in actors:
            actor.set_app.remote(app_fn)  # Ray runs it before the actor's first run
        pool.pool = actors
        pool.num_actors = len(actors)  # Flower starts one worker thread per actor
        self.pool = pool
        self.app_fn = app_fn

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        if self.pool is None:
            raise ValueError("The actor pool is empty, unfit to process messages.")
        future = None
        try:
            future = self.pool.submit(
                lambda actor, _app_fn, msg, cid, state: actor.run.remote(msg, cid, state),
                (self.app_fn, message, str(context.node_config["partition-id"]), context),
            )
            return self.pool.fetch_result_and_return_actor_to_pool(future)
        except Exception:
            if future is not None and future in self.pool._future_to_actor:
                self.pool.add_actor_back_to_pool(future)
            raise

    def process_call(self, messages: list[Message], contexts: list[Context]) -> Iterator[tuple[Any, Context | None]]:
        """Run ``messages`` (each with its node's Context) in one call to an idle
        actor, yielding ``(reply, updated Context)`` for each as soon as its
        client finishes, or ``(exception, None)`` for a client that failed.

        The actor's streaming generator (:meth:`fedlr.actor.ClientActor.run_call`)
        ends at a failure with the client's exception, exactly the exception
        :meth:`process_message` would have raised; the messages behind it are
        then sent again in a new call, so a failure costs only its own client. A
        dead actor fails every message left in its call the same way.
        """
        if self.pool is None:
            raise ValueError("The actor pool is empty, unfit to process messages.")
        if len(messages) == 1:  # a plain task: a stream of one costs more (measured)
            try:
                yield self.process_message(messages[0], contexts[0])
            except Exception as ex:  # noqa: BLE001 - this client's failure, reported as its reply
                yield ex, None
            return
        # One worker thread per actor and one call per worker at a time: an idle
        # actor is always there (list.pop and append are atomic).
        actor = self.pool.pool.pop()
        try:
            jobs = [(m, str(c.node_config["partition-id"]), c) for m, c in zip(messages, contexts)]
            start = 0
            while start < len(jobs):
                stream = actor.run_call.options(num_returns="streaming").remote(jobs[start:])
                try:
                    for ref in stream:
                        _, reply, context = ray.get(ref)
                        start += 1
                        yield reply, context
                except Exception as ex:  # noqa: BLE001 - this client's failure, reported as its reply
                    start += 1
                    yield ex, None
        finally:
            self.pool.pool.append(actor)

    def terminate(self) -> None:
        from fedlr.raystart import shutdown_ray

        shutdown_ray(lean=_START is not None and _START.lean, actors=list(self.pool.pool) if self.pool else [])
