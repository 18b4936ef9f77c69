"""The controller's shell: turn store changes into reconciles and carry out their plans.

``Controller`` owns a work queue of ModelDeployment keys ``(namespace, name)``. A change to
any watched object enqueues the ModelDeployments of its namespace; every key is also
re-enqueued each evaluation period. One worker thread takes keys while this replica leads:
it builds the ``World`` from the store, asks ``reconcile.plan`` what to do, does it (the
finalizer first when adding, last when removing), evaluates the offloading decision when
due, writes the status only when it differs, and records an Event per condition change.

A failed API call requeues the key with backoff; a conflict (the object changed under us)
requeues at once: the next attempt reads the new version. Nothing is kept in memory that
the objects do not also say, except the decision windows (a successor continues from the
published decision) and when each key was last evaluated.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from crds.backoff import Backoff
from crds.model import GROUP, PLURAL, VERSION
from crds.signals import has_local_metrics
from crds.validation import ValidationSettings, validate_object
from webhook.cache import (
    DEPLOYMENTS,
    ENDPOINTSLICES,
    MODELDEPLOYMENTS,
    PODS,
    REPLICASETS,
    ROLEBINDINGS,
    SERVICES,
    STATEFULSETS,
)
from webhook.controller import pods as podq
from webhook.controller import rbac, reconcile, standin
from webhook.controller.conditions import Condition, merge, transitions
from webhook.controller.store import Store
from webhook.controller.workqueue import WorkQueue

log = logging.getLogger("webhook.controller")

Key = tuple[str, str]
JSON_PATCH = "application/json-patch+json"  # RFC 6902: lists of ops, with a test of resourceVersion
MERGE_PATCH = "application/merge-patch+json"  # RFC 7386: the status subresource, RoleBinding subjects
KINDS = {"Deployment": DEPLOYMENTS, "StatefulSet": STATEFULSETS}


class Evaluation(Protocol):
    """The offloading decision for one ModelDeployment
    (``webhook.controller.evaluation.ControllerEvaluation``)."""

    def evaluate(
        self,
        key: Key,
        model: Any,
        pods: list[Mapping[str, Any]],
        status: Mapping[str, Any],
        generation: int,
        *,
        workload: Mapping[str, Any] | None = None,
    ) -> tuple[dict[str, Any], Condition]:
        """(status fields: offloading, offloadingStatus, utilization, decision; the Offloading condition)."""
        ...

    def forget(self, key: Key) -> None: ...


@dataclass(frozen=True)
class Options:
    sidecar_cluster_role: str
    release: bool = False
    period: float = 15.0  # seconds between evaluations of one ModelDeployment
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    # Seconds between evaluations of a ModelDeployment with Pods metrics the sidecars
    # serve (read from the pods, no metrics API): the decision follows them within
    # seconds; its status is still written at most every `period` unless it changes.
    signals_period: float = 1.0
    # The gateway that stands in for workloads with no ready pod (None: there is none).
    gateway: standin.GatewaySettings | None = None


def evaluation_period(model: Any, options: Options) -> float:
    """Seconds between two evaluations of ``model`` (a validated ModelDeployment or None):
    ``signals_period`` when a metric is served by the sidecars, else ``period``."""
    config = model.spec.offloading_config if model is not None else None
    if has_local_metrics(config):
        return min(options.signals_period, options.period)
    return options.period


def publishes(status: Mapping[str, Any], decided: Mapping[str, Any], since: float, period: float) -> bool:
    """Whether an evaluation made every ``signals_period`` is written to the status now: when
    the decision changed (on/off, or its reason code, which the sidecars and Events follow),
    else once ``period`` seconds have passed since the last write (``since``). The observed
    values change every second, and each status write reaches every sidecar of the workload."""
    before = status.get("decision") or {}
    after = decided.get("decision") or {}
    if decided.get("offloading") != status.get("offloading") or after.get("reason") != before.get("reason"):
        return True
    return since >= period


# A key whose reconcile failed waits 0.5 s, 1 s, 2 s, ... at most 30 s. No jitter: each key
# retries alone, as controller-runtime's per-item exponential limiter does.
RETRY = Backoff(base=0.5, cap=30.0, jitter=False)
# A conflict (409) or a refused write (422) is retried almost at once: the next attempt
# reads the object's new version.
REQUEUE_AFTER_CONFLICT = 0.2


def _rfc3339(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


class Controller:
    def __init__(
        self,
        api_client: Any,
        store: Store,
        options: Options,
        *,
        evaluation: Evaluation | None = None,
        leading: Callable[[], bool] = lambda: True,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        clock: Callable[[], float] = time.monotonic,
        metrics: Any = None,
        backoff: Backoff = RETRY,
    ) -> None:
        import kubernetes

        self._core = kubernetes.client.CoreV1Api(api_client)
        self._custom = kubernetes.client.CustomObjectsApi(api_client)
        self._rbac = kubernetes.client.RbacAuthorizationV1Api(api_client)
        self._discovery = kubernetes.client.DiscoveryV1Api(api_client)
        self._api_exception = kubernetes.client.ApiException
        self.store = store
        self.options = options
        self._evaluation = evaluation
        self._leading = leading
        self._wall = wall_clock
        self._clock = clock
        self._metrics = metrics
        self._backoff = backoff
        self.queue = WorkQueue(clock)
        self._failures: dict[Key, int] = {}
        # uid -> resourceVersions an object had before our writes to it: while the store still
        # shows one of them, it has not seen our last write (the watch lags by a few ms).
        self._written: dict[str, set[str]] = {}
        self._evaluated_at: dict[Key, float] = {}
        self._published_at: dict[Key, float] = {}
        # Gateway ports this process assigned, for as long as the store may not show them yet.
        self._ports: dict[Key, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        store.set_on_change(self._changed)

    # -- wiring --

    def _changed(self, resource: str, namespace: str) -> None:
        for md in self.store.list(MODELDEPLOYMENTS, namespace):
            self.queue.add((namespace, podq.name_of(md)))
        gateway = self.options.gateway
        if resource == PODS and gateway is not None and namespace == gateway.namespace:
            self.enqueue_all()  # a gateway pod's readiness changes the slices of all
        if resource == ENDPOINTSLICES:
            # A slice whose ModelDeployment is gone is deleted by that key's reconcile.
            for s in self.store.list(ENDPOINTSLICES, namespace):
                owner = podq.labels_of(s).get(standin.MODELDEPLOYMENT_LABEL)
                if owner:
                    self.queue.add((namespace, owner))

    def enqueue_all(self) -> None:
        for namespace in self.store.namespaces(MODELDEPLOYMENTS):
            for md in self.store.list(MODELDEPLOYMENTS, namespace):
                self.queue.add((namespace, podq.name_of(md)))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="controller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.queue.close()
        if self._thread is not None:
            self._thread.join(10)

    def _work(self) -> None:
        while not self._stop.is_set():
            key = self.queue.get(timeout=1.0)
            if key is None:
                continue
            try:
                if not self._leading() or not self.store.synced():
                    # Followers keep the key for when they lead; nothing is written meanwhile.
                    self.queue.add_after(key, 1.0)
                    continue
                self._reconcile_timed(key)  # type: ignore[arg-type]
            finally:
                self.queue.done(key)

    def _reconcile_timed(self, key: Key) -> None:
        started = self._clock()
        result = "success"
        try:
            requeue = self.reconcile(key)
            self._failures.pop(key, None)
            if requeue is not None:
                self.queue.add_after(key, requeue)
        except self._api_exception as exc:
            result = "requeue" if exc.status in (409, 422) else "error"
            delay = self._retry_delay(key)  # a conflict counts as a failure too
            if result == "requeue":
                delay = REQUEUE_AFTER_CONFLICT
            level = logging.INFO if result == "requeue" else logging.WARNING
            log.log(level, "reconcile %s/%s: API %s %s; again in %.1fs", *key, exc.status, exc.reason, delay)
            self.queue.add_after(key, delay)
        except Exception:
            result = "error"
            log.exception("reconcile %s/%s failed", *key)
            self.queue.add_after(key, self._retry_delay(key))
        finally:
            if self._metrics is not None:
                self._metrics.reconciled(result, self._clock() - started)

    def _retry_delay(self, key: Key) -> float:
        """The wait before this key's next attempt; counts the failure (a success resets it)."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        return self._backoff.delay(failures)

    # -- one ModelDeployment --

    def world(self, md: Mapping[str, Any]) -> reconcile.World:
        """What the store shows for ``md``."""
        namespace = str((md.get("metadata") or {}).get("namespace"))
        result = validate_object(md, self.options.validation)
        model = result.model
        binding = self.store.get(ROLEBINDINGS, namespace, rbac.binding_name(podq.name_of(md)))
        if model is None:
            return reconcile.World(md, None, result.message(), rolebinding=binding)
        ref = model.spec.model_source_ref
        workload = self.store.get(KINDS.get(ref.kind, DEPLOYMENTS), model.workload_namespace, ref.name)
        workload_pods: list[Mapping[str, Any]] = []
        if workload is not None:
            workload_pods = podq.owned_pods(
                workload,
                ref.kind,
                self.store.list(REPLICASETS, model.workload_namespace),
                self.store.list(PODS, model.workload_namespace),
            )
        service = service_pods = None
        sref = model.spec.service_ref
        if sref is not None and model.service_namespace == namespace:
            service = self.store.get(SERVICES, namespace, sref.name)
            if service is not None:
                selector = (service.get("spec") or {}).get("selector")
                service_pods = podq.selected_by(selector, self.store.list(PODS, namespace))
        return reconcile.World(
            md,
            model,
            workload=workload,
            workload_pods=workload_pods,
            service=service,
            service_pods=service_pods or (),
            rolebinding=binding,
        )

    def reconcile(self, key: Key) -> float | None:
        """Converge one ModelDeployment; the delay before it is looked at again, if any."""
        namespace, name = key
        md = self.store.get(MODELDEPLOYMENTS, namespace, name)
        if md is None:
            self._evaluated_at.pop(key, None)
            self._published_at.pop(key, None)
            self._failures.pop(key, None)
            if self._metrics is not None:
                self._metrics.without_sidecar(key, 0)
            self._ports.pop(key, None)
            for s in standin.ours_for(self.store.list(ENDPOINTSLICES, namespace), name):
                self._ignore_missing(
                    lambda s=s: self._discovery.delete_namespaced_endpoint_slice(podq.name_of(s), namespace)
                )
            if self._evaluation is not None:
                self._evaluation.forget(key)
            return None
        world = self.world(md)
        slices = standin.ours_for(self.store.list(ENDPOINTSLICES, namespace), name)
        if (
            self._behind(md)
            or (world.service is not None and self._behind(world.service))
            or any(self._behind(s) for s in slices)
        ):
            return 0.1  # our last write has not reached the store yet: acting now would undo it
        settings = reconcile.Settings(self.options.sidecar_cluster_role, release=self.options.release)
        status = md.get("status") or {}
        decided: dict[str, Any] = {}
        due = self._evaluation is not None and world.model is not None and not self.options.release
        due = due and not (md.get("metadata") or {}).get("deletionTimestamp")
        period = evaluation_period(world.model, self.options)
        if due and self._clock() - self._evaluated_at.get(key, -1e18) >= period:
            assert self._evaluation is not None
            decided, offloading = self._evaluation.evaluate(
                key,
                world.model,
                list(world.workload_pods),
                status,
                int((md.get("metadata") or {}).get("generation") or 0),
                workload=world.workload,
            )
            self._evaluated_at[key] = self._clock()
            since = self._clock() - self._published_at.get(key, -1e18)
            if period >= self.options.period or publishes(status, decided, since, self.options.period):
                self._published_at[key] = self._clock()
                world = reconcile.World(**{**world.__dict__, "offloading": offloading})
            else:
                decided = {}  # kept for a later write: the published decision stands
        if due and not decided and status.get("conditions"):
            previous = next((c for c in status["conditions"] if c.get("type") == "Offloading"), None)
            if previous is not None:
                world = reconcile.World(
                    **{
                        **world.__dict__,
                        "offloading": Condition(
                            "Offloading",
                            {"True": True, "False": False}.get(previous.get("status")),
                            str(previous.get("reason") or ""),
                            str(previous.get("message") or ""),
                        ),
                    }
                )
        plan = reconcile.plan(world, settings)
        if self._metrics is not None:
            self._metrics.without_sidecar(key, plan.without_sidecar)
        stand_in = self.stand_in(key, md, world)
        self._carry_out_stand_in(md, stand_in)  # before the finalizer can go
        md = self._carry_out(md, plan, world.service)
        if plan.remove_finalizer or (md.get("metadata") or {}).get("deletionTimestamp"):
            return None
        if stand_in.condition is not None:
            plan = replace(plan, conditions=[*plan.conditions, stand_in.condition])
        if self.options.gateway is not None or "standIn" in status:
            decided = {**decided, "standIn": stand_in.status}
        self._write_status(md, plan, decided)
        if self.options.release:
            return None
        return min(period, stand_in.recheck_after) if stand_in.recheck_after else period

    # -- standing in (webhook.controller.standin) --

    def stand_in(self, key: Key, md: Mapping[str, Any], world: reconcile.World) -> standin.StandInPlan:
        """The stand-in plan of ``md`` from the store (a gateway port assigned if it needs one)."""
        gateway = self.options.gateway
        meta = md.get("metadata") or {}
        releasing = self.options.release or bool(meta.get("deletionTimestamp")) or world.namespace_terminating
        port = None
        if gateway is not None and not releasing and standin.wants_port(world.model):
            port = self._port_for(key, md, gateway)
        else:
            self._ports.pop(key, None)
        gateway_pods = (
            podq.selected_by(gateway.selector, self.store.list(PODS, gateway.namespace))
            if gateway is not None
            else []
        )
        return standin.plan(
            standin.StandInWorld(
                md,
                world.model,
                workload=world.workload,
                workload_pods=world.workload_pods,
                service=world.service,
                service_pods=world.service_pods,
                gateway_pods=gateway_pods,
                slices=self.store.list(ENDPOINTSLICES, key[0]),
                port=port,
                releasing=releasing,
                now=self._wall(),
            ),
            gateway,
        )

    def _port_for(self, key: Key, md: Mapping[str, Any], gateway: standin.GatewaySettings) -> int | None:
        def published(obj: Mapping[str, Any], k: Key) -> Any:
            port = ((obj.get("status") or {}).get("standIn") or {}).get("port")
            return port if port is not None else self._ports.get(k)

        claims = []
        for namespace in self.store.namespaces(MODELDEPLOYMENTS):
            for other in self.store.list(MODELDEPLOYMENTS, namespace):
                k = (namespace, podq.name_of(other))
                port = published(other, k)
                if isinstance(port, int) and k != key:
                    created = str((other.get("metadata") or {}).get("creationTimestamp") or "")
                    claims.append(standin.Claim(port, created, k))
        created = str((md.get("metadata") or {}).get("creationTimestamp") or "")
        port = standin.assign_port(key, created, published(md, key), claims, gateway.ports)
        if port is None:
            self._ports.pop(key, None)
        else:
            self._ports[key] = port
        return port

    def _carry_out_stand_in(self, md: Mapping[str, Any], plan: standin.StandInPlan) -> None:
        namespace = str((md.get("metadata") or {}).get("namespace"))
        changed = False  # the Event only when this reconcile did start or stop standing in
        for action in plan.actions:
            there = self.store.get(ENDPOINTSLICES, namespace, action.name)
            try:
                if action.verb == "delete":
                    self._discovery.delete_namespaced_endpoint_slice(action.name, namespace)
                elif action.verb == "create":
                    self._discovery.create_namespaced_endpoint_slice(namespace, action.body)
                elif action.verb == "patch":
                    self._discovery.patch_namespaced_endpoint_slice(
                        action.name, namespace, action.body, _content_type=JSON_PATCH
                    )
            except self._api_exception as exc:
                # Gone already, or created by our last reconcile before the store saw it: done.
                if (action.verb, exc.status) not in (("delete", 404), ("create", 409)):
                    raise
                continue
            changed = changed or action.verb in ("create", "delete")
            if action.verb == "patch" and there is not None:
                self._wrote(there)  # the store's copy is stale until the watch brings ours
        if plan.event is not None and changed:
            self.event(md, *plan.event)
            log.info("%s/%s: %s: %s", namespace, podq.name_of(md), plan.event[1], plan.event[2])

    def _behind(self, obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        uid, version = str(meta.get("uid") or ""), str(meta.get("resourceVersion"))
        if uid not in self._written:
            return False
        if version in self._written[uid]:
            return True
        del self._written[uid]
        return False

    def _wrote(self, obj: Mapping[str, Any] | None, version: str | None = None) -> None:
        """Remember that ``obj`` (as read before the write, or at ``version``) is now stale."""
        meta = (obj or {}).get("metadata") or {}
        if meta.get("uid"):
            self._written.setdefault(str(meta["uid"]), set()).add(str(version or meta.get("resourceVersion")))

    def _carry_out(
        self, md: Mapping[str, Any], plan: reconcile.Plan, plan_service: Mapping[str, Any] | None = None
    ) -> Mapping[str, Any]:
        """Does the plan; returns ``md`` at its resourceVersion after our own writes."""
        meta = md.get("metadata") or {}
        namespace, name = str(meta.get("namespace")), str(meta.get("name"))
        if plan.add_finalizer:
            updated = self._patch_md(md, self._finalizer_patch(md, add=True))
            self._wrote(md)
            # A status write follows on this version of the object.
            md = {
                **md,
                "metadata": {
                    **meta,
                    "resourceVersion": (updated.get("metadata") or {}).get("resourceVersion"),
                },
            }
        if plan.service_patch:
            service_name = str(((md.get("spec") or {}).get("serviceRef") or {}).get("name"))
            patch = plan.service_patch
            self._ignore_missing(
                lambda: self._core.patch_namespaced_service(
                    service_name, namespace, patch, _content_type=JSON_PATCH
                )
            )
            self._wrote(plan_service)
            verb = "Captured" if plan.service_patch_why == "capture" else "Restored"
            message = (
                f"Service {service_name} now points at the sidecars' offload-proxy port"
                if verb == "Captured"
                else f"Service {service_name} points at the model's own port again"
            )
            self.event(md, "Normal", f"Service{verb}", message)
            log.info("%s/%s: %s", namespace, name, message)
        action = plan.rolebinding
        if action is not None:
            binding = rbac.binding_name(name)
            if action.verb in ("delete", "recreate"):
                self._ignore_missing(lambda: self._rbac.delete_namespaced_role_binding(binding, namespace))
            if action.verb in ("create", "recreate"):
                self._rbac.create_namespaced_role_binding(namespace, action.body)
            if action.verb == "patch-subjects":
                assert action.body is not None
                self._rbac.patch_namespaced_role_binding(
                    binding, namespace, {"subjects": action.body["subjects"]}, _content_type=MERGE_PATCH
                )
        if plan.remove_finalizer:
            self._ignore_missing(lambda: self._patch_md(md, self._finalizer_patch(md, add=False)))
            log.info("%s/%s: cleaned up, finalizer removed", namespace, name)
        return md

    def _ignore_missing(self, call: Callable[[], Any]) -> None:
        try:
            call()
        except self._api_exception as exc:
            if exc.status != 404:  # already gone counts as done
                raise

    def _finalizer_patch(self, md: Mapping[str, Any], *, add: bool) -> list[dict[str, Any]]:
        meta = md.get("metadata") or {}
        finalizers = list(meta.get("finalizers") or [])
        test = {"op": "test", "path": "/metadata/resourceVersion", "value": meta.get("resourceVersion")}
        if add:
            if not finalizers:
                return [test, {"op": "add", "path": "/metadata/finalizers", "value": [reconcile.FINALIZER]}]
            return [test, {"op": "add", "path": "/metadata/finalizers/-", "value": reconcile.FINALIZER}]
        index = finalizers.index(reconcile.FINALIZER)
        return [test, {"op": "remove", "path": f"/metadata/finalizers/{index}"}]

    def _patch_md(self, md: Mapping[str, Any], patch: list[dict[str, Any]]) -> dict[str, Any]:
        meta = md.get("metadata") or {}
        return self._custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            str(meta.get("namespace")),
            PLURAL,
            str(meta.get("name")),
            patch,
            _content_type=JSON_PATCH,
        )

    def _write_status(self, md: Mapping[str, Any], plan: reconcile.Plan, decided: Mapping[str, Any]) -> None:
        meta = md.get("metadata") or {}
        status = md.get("status") or {}
        generation = int(meta.get("generation") or 0)
        now = _rfc3339(self._wall())
        conditions = merge(status.get("conditions"), plan.conditions, generation=generation, now=now)
        wanted: dict[str, Any] = {
            "observedGeneration": generation,
            "conditions": conditions,
            "injected": plan.injected,
            "captured": plan.captured,
            **decided,
        }
        if all(status.get(k) == v for k, v in wanted.items()):
            return
        for cond in transitions(status.get("conditions"), plan.conditions):
            if cond.type == "Ready" or (cond.type == "Valid" and cond.status is not False):
                continue  # Ready sums up the others, which have Events of their own
            if cond.type == standin.REMOTE_STANDING_IN:
                # Starting and stopping have their own Events (with the slice); only trouble warns.
                if cond.status is False and cond.reason in standin.WARNING_REASONS:
                    self.event(md, "Warning", cond.reason, cond.message)
                continue
            if cond.type == "Offloading":
                reason = "OffloadingStarted" if cond.status else "OffloadingStopped"
                was = next((c for c in status.get("conditions") or [] if c.get("type") == "Offloading"), None)
                if was is not None and was.get("status") == cond.status_text:
                    continue  # same state, another reason: no Event
                if was is None and not cond.status:
                    continue
                self.event(md, "Normal", reason, cond.message)
                continue
            if cond.status is False:
                self.event(md, "Warning", cond.reason, cond.message)
        self._custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            str(meta.get("namespace")),
            PLURAL,
            str(meta.get("name")),
            {"status": wanted},
            _content_type=MERGE_PATCH,
        )
        self._wrote(md)

    # -- Events --

    def event(self, md: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on the ModelDeployment (what ``kubectl describe`` shows)."""
        import kubernetes

        meta = md.get("metadata") or {}
        namespace = str(meta.get("namespace"))
        now = datetime.now(UTC)
        body = kubernetes.client.CoreV1Event(
            metadata=kubernetes.client.V1ObjectMeta(
                name=f"{meta.get('name')}.{uuid.uuid4().hex[:16]}", namespace=namespace
            ),
            involved_object=kubernetes.client.V1ObjectReference(
                api_version=f"{GROUP}/{VERSION}",
                kind="ModelDeployment",
                name=meta.get("name"),
                namespace=namespace,
                uid=meta.get("uid"),
                resource_version=meta.get("resourceVersion"),
            ),
            reason=reason,
            message=message[:1024],
            type=type_,
            first_timestamp=now,
            last_timestamp=now,
            count=1,
            source=kubernetes.client.V1EventSource(component="offload-controller"),
            reporting_component="offload.beamlit.com/controller",
            reporting_instance="offload-webhook",
        )
        try:
            self._core.create_namespaced_event(namespace, body)
        except self._api_exception as exc:
            # A namespace being deleted refuses new objects; an Event is never worth a retry.
            log.info("event %s on %s/%s not recorded: %s", reason, namespace, meta.get("name"), exc.reason)
