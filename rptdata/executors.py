"""Run a stage's shard units: here, one after another (`local`), or spread over a Ray cluster (`ray`).

    executor = Executor("ray", address=None)            # --executor ray [--ray-address ...]
    for unit, stats in run_units(todo, factory, executor, bar=bar, weights=weights, describe=describe):
        ...                                              # in completion order, on the driver

The stage decides what is left (`todo`: shard indices whose completion marker is missing or
damaged, `StageDir.begin`/`done_shards`), what a unit is and what it writes; this module only runs
units. A stage hands over:
  factory   a picklable callable (a module-level class or dataclass instance) returning a worker,
            an object with `run(unit, advance) -> stats`: it writes the unit's shard and completion
            marker (with its integrity record) and returns the marker's stats. The factory does
            the heavy loading (tokenizer, scorer) once per process: once here, once per Ray
            worker process (tasks) or once per actor.
  weights   unit -> how far a finished unit moves the progress bar (the local worker moves it
            itself through `advance`, as finely as it likes; on Ray the driver moves it per unit).
  describe  unit -> "shard X (input Y)", for the error of a unit that failed.

Local: today's loop, in this process; the first error stops the run (a rerun resumes).

Ray (`Executor("ray")`): connects to `address`, else RAY_ADDRESS, else starts a local cluster with
this machine's CPUs and GPUs for the run (`ray.init(address="local")`). Every node must see the
same paths (a shared file system) and have rpt installed. An address where no Ray cluster answers
is an error naming it within seconds (`rptdata.ray_connect`; the stages check it with
`Executor.check` before they write anything).
  tasks   (`actors=False`, prepare) one CPU task per unit, `max_retries=MAX_RETRIES`: Ray reruns a
          task whose worker process or node died, on any node with a free slot.
  actors  (`actors=True`, score-entropy) one actor per GPU (`num_gpus=1`; on a cluster without GPUs,
          one per node with all its CPU slots), each loading one scorer and taking units from one
          queue, so a fast node takes more. A unit whose actor died (its node left) goes back to the queue,
          at most MAX_RETRIES times, and the dead actor is replaced when the cluster has room.
An error raised by a unit's own code (a bad record, a damaged input) is not retried: the other
units finish, then `UnitsFailed` names each failed shard and its input. A rerun skips every
completed shard and redoes only those.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from rptdata import faults
from rptdata.errors import BadOption, RptError
from rptdata.ray_connect import check_address, connect

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
MAX_RETRIES = 3  # Ray's retries of a unit whose process, actor or node died


class UnitsFailed(RptError):
    """Units that failed on the cluster after their retries; the message names each shard and input."""


@dataclass(frozen=True)
class Executor:
    """Where a stage's units run: "local" (this process) or "ray" (a Ray cluster at `address`,
    else RAY_ADDRESS, else a local cluster started for the run)."""

    kind: str = "local"
    address: str | None = None

    def __post_init__(self):
        if self.kind not in EXECUTORS:
            raise BadOption(f"--executor must be one of {', '.join(EXECUTORS)}, not {self.kind!r}")
        if self.address and self.kind != "ray":
            raise BadOption("--ray-address is for --executor ray")

    def check(self) -> None:
        """With --executor ray: RayUnreachable now, before the stage writes anything, when the cluster
        address given does not answer (`check_address`)."""
        if self.kind == "ray":
            check_address(self.address)

    def refuse(self, **options) -> None:
        """ValueError naming the first option (name -> given value; None or False: not given) that
        the ray executor cannot honour: it runs every shard of the stage itself."""
        if self.kind != "ray":
            return
        for name, value in options.items():
            if value is not None and value is not False:
                raise BadOption(
                    f"--executor ray runs every shard of the stage on the cluster; it does not combine with {name} "
                    f"(given: {value}). Drop {name}, or use --executor local."
                )


def run_units(
    todo: list[int],
    factory: Callable,
    executor: Executor,
    *,
    bar,
    weights: dict[int, int],
    describe: Callable[[int], str],
    actors: bool = False,
) -> Iterator[tuple[int, dict]]:
    """Run every unit of `todo` (see the module docstring); yields (unit, stats) as each finishes."""
    if not todo:
        return
    if executor.kind == "local":
        worker = factory()
        for unit in todo:
            yield unit, worker.run(unit, bar.update)
        return
    yield from _RayRun(todo, factory, executor, bar, weights, describe, actors).run()


# -- the Ray side ------------------------------------------------------------------------------


_WORKERS: dict[bytes, object] = {}  # this Ray worker process's worker, by its factory's pickle


def _worker_for(factory):
    key = hashlib.sha1(pickle.dumps(factory)).digest()
    if key not in _WORKERS:
        _WORKERS.clear()  # one stage at a time per process
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one CPU slot, one thread
        _WORKERS[key] = factory()
    return _WORKERS[key]


def _task(factory, unit: int) -> dict:
    worker = _worker_for(factory)
    faults.hit("unit", unit)
    return worker.run(unit, _no_progress)


def _no_progress(n: int) -> None:
    pass


class _UnitActor:
    """One worker (one scorer) for the life of the actor."""

    def __init__(self, factory):
        self.worker = factory()

    def ready(self) -> bool:
        return True

    def run(self, unit: int) -> dict:
        faults.hit("unit", unit)
        return self.worker.run(unit, _no_progress)


class _RayRun:
    """One stage's units on Ray: submit, collect in completion order, requeue units of dead actors."""

    def __init__(self, todo, factory, executor: Executor, bar, weights, describe, actors: bool):
        self.ray = connect(executor.address)
        self.todo, self.bar, self.weights, self.describe = list(todo), bar, weights, describe
        self.factory = self.ray.put(factory)
        self.failed: list[str] = []
        self.actors = actors

    def run(self) -> Iterator[tuple[int, dict]]:
        yield from (self._actors() if self.actors else self._tasks())
        if self.failed:
            raise UnitsFailed(
                f"{len(self.failed)} of {len(self.todo)} unit(s) failed on the Ray cluster (the others are done; "
                "rerun the same command to redo only these):\n  " + "\n  ".join(self.failed)
            )

    def _done(self, unit: int, ref) -> tuple[int, dict] | None:
        """(unit, stats) of a finished call, or None (its failure recorded) when it raised."""
        ray = self.ray
        try:
            stats = ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # the unit's own code raised: not retried
            self.failed.append(f"{self.describe(unit)}: {_cause(e)}")
            return None
        self.bar.update(self.weights.get(unit, 0))
        return unit, stats

    def _tasks(self) -> Iterator[tuple[int, dict]]:
        ray = self.ray
        remote = ray.remote(_task).options(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)
        pending = {remote.remote(self.factory, u): u for u in self.todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            unit = pending.pop(ready[0])
            try:
                result = self._done(unit, ready[0])
            except ray.exceptions.RayError as e:  # retries used up (worker or node died each time)
                self.failed.append(
                    f"{self.describe(unit)}: {type(e).__name__} after {MAX_RETRIES} retries: {_cause(e)}"
                )
                continue
            if result is not None:
                yield result

    def _actor_shapes(self) -> list[dict]:
        """Ray options of each actor: one per GPU; on a cluster without GPUs one per node, holding
        all its CPU slots (torch then uses as many threads as a local run on that node, so the
        floats come out bit for bit the same)."""
        ray = self.ray
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus:
            return [{"num_gpus": 1, "num_cpus": 1}] * gpus
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return [
            {
                "num_cpus": int(node["Resources"]["CPU"]),
                "scheduling_strategy": NodeAffinitySchedulingStrategy(node["NodeID"], soft=True),
            }
            for node in ray.nodes()
            if node["Alive"] and node["Resources"].get("CPU", 0) >= 1
        ] or [{"num_cpus": 1}]

    def _actors(self) -> Iterator[tuple[int, dict]]:
        ray = self.ray
        queue, attempts = list(self.todo), {u: 0 for u in self.todo}
        shapes = self._actor_shapes()[: len(queue)]
        starting, shape_of = {}, {}  # ready() ref -> actor still loading its scorer; actor -> its options

        def start(shape: dict) -> None:
            actor = ray.remote(_UnitActor).options(max_restarts=0, **shape).remote(self.factory)
            starting[actor.ready.remote()] = actor
            shape_of[actor] = shape

        for shape in shapes:
            start(shape)
        busy, idle, dead, replacements = {}, [], [], MAX_RETRIES * len(shapes)
        try:
            while queue or busy:
                while idle and queue:
                    actor, unit = idle.pop(), queue.pop(0)
                    busy[actor.run.remote(unit)] = (unit, actor)
                if not busy and not starting:
                    raise UnitsFailed(f"no Ray actor could be started for {self.describe(queue[0])}")
                ready, _ = ray.wait([*busy, *starting], num_returns=1)
                ref = ready[0]
                if ref in starting:
                    actor = starting.pop(ref)
                    try:
                        ray.get(ref)
                        idle.append(actor)
                    except ray.exceptions.RayError as e:  # its scorer did not load: no actor will
                        raise UnitsFailed(f"a Ray actor could not load its worker: {_cause(e)}") from None
                    continue
                unit, actor = busy.pop(ref)
                try:
                    result = self._done(unit, ref)
                except ray.exceptions.RayActorError as e:  # the actor (its process or node) died
                    dead.append(actor)
                    attempts[unit] += 1
                    if attempts[unit] > MAX_RETRIES:
                        self.failed.append(f"{self.describe(unit)}: its actor died {attempts[unit]} times: {_cause(e)}")
                    else:
                        log.warning("ray: the actor running %s died (%s); retrying it", self.describe(unit), _cause(e))
                        queue.insert(0, unit)
                    if replacements > 0:  # it starts when the cluster has room (a node joins)
                        replacements -= 1
                        start(shape_of[actor])
                    continue
                idle.append(actor)
                if result is not None:
                    yield result
        finally:
            for actor in [*idle, *dead, *(a for _, a in busy.values()), *starting.values()]:
                ray.kill(actor)


def _cause(error: BaseException) -> str:
    """The message of the error a unit's code raised, without Ray's traceback wrapper."""
    cause = getattr(error, "cause", None)
    if cause is not None and not isinstance(cause, type(error)):
        return f"{type(cause).__name__}: {cause}" if not isinstance(cause, RptError) else str(cause)
    return str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
