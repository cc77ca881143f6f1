"""Which learner-group failures restart the group from the last checkpoint (orchestrator.run._lost_worker)."""

import ray
from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
from ray.train.v2.api.exceptions import WorkerGroupError

from orchestrator.run import _lost_worker

WORKER = "Worker(actor=Actor(RayTrainWorker, 7a878dbd4de9ad66d7beba3e01000000), metadata=...)"


def group_error(failure: BaseException) -> WorkerGroupError:
    return WorkerGroupError("rank 0 failed", {0: failure})


def test_a_worker_found_unavailable_by_the_health_check_is_a_lost_learner():
    # A SIGKILLed learner seen by Ray Train's health check: the failure it wraps does not name the class.
    unavailable = ray.exceptions.ActorUnavailableError("The actor is temporarily unavailable: RpcError", None)
    error = group_error(WorkerHealthCheckFailedError(f"A worker health check failed.\nWorker info: {WORKER}", unavailable))
    lost = _lost_worker(error, pool_actors=set())
    assert lost is not None and lost.startswith("rank 0: A worker health check failed")


def test_an_error_of_the_run_itself_or_a_dead_pool_actor_is_not():
    assert _lost_worker(group_error(ValueError("reward 'x' returned NaN")), pool_actors=set()) is None
    pool_actor = "d1e2f3"
    died = ray.exceptions.ActorUnavailableError(f"RolloutWorker {pool_actor} is gone", None)
    error = group_error(WorkerHealthCheckFailedError(f"A worker health check failed.\nWorker info: {WORKER} {pool_actor}", died))
    assert _lost_worker(error, pool_actors={pool_actor}) is None
