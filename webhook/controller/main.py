"""Starting the controller inside ``offload-webhook``: flags, leader election, wiring."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

from crds.validation import ValidationSettings
from webhook.cache import (
    CONTROLLER_RESOURCES,
    ENDPOINTSLICES,
    MODELDEPLOYMENTS,
    RESOURCES,
    ROLEBINDINGS,
    SERVICES,
    ClusterCache,
)
from webhook.controller import capture, rbac, standin
from webhook.controller.leader import LeaderElector, Timing
from webhook.controller.reconcile import FINALIZER
from webhook.controller.runner import Controller, Evaluation, Options
from webhook.controller.store import Fanout, Store
from webhook.watches import CacheSync

log = logging.getLogger("webhook.controller")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "controller",
        "The ModelDeployment controller runs in the webhook process (with --injector-config) and "
        "reconciles only in the replica that holds the leader Lease.",
    )
    group.add_argument(
        "--controller",
        choices=["on", "off"],
        default="on",
        help="on: capture Services, bind the sidecars' Role, decide offloading, write status; "
        "off: undo all of that (restore Services, delete RoleBindings, remove finalizers) and "
        "create nothing (default: %(default)s)",
    )
    group.add_argument(
        "--release-all",
        action="store_true",
        help="one shot, for uninstalling: take the leader Lease, undo everything as --controller=off "
        "does, keep holding the Lease (so no replica captures again) and exit",
    )
    group.add_argument(
        "--sidecar-cluster-role",
        default="offload-sidecar",
        help="the ClusterRole bound to each workload's service account (default: %(default)s)",
    )
    group.add_argument(
        "--evaluation-period",
        type=positive_seconds,
        default=15.0,
        metavar="SECONDS",
        help="how often each ModelDeployment's metrics are evaluated (default: %(default)s)",
    )
    group.add_argument(
        "--signals-period",
        type=positive_seconds,
        default=1.0,
        metavar="SECONDS",
        help="how often a ModelDeployment with Pods metrics the sidecars serve is evaluated, from "
        "each ready pod's /signals on its offload-admin port; its status is still written at most "
        "every --evaluation-period unless the decision changes (default: %(default)s)",
    )
    group.add_argument(
        "--leader-election-namespace",
        default=os.environ.get("POD_NAMESPACE") or "default",
        help="namespace of the leader Lease (default: $POD_NAMESPACE, else %(default)s)",
    )
    group.add_argument(
        "--leader-election-lease", default="offload-controller", help="name of the leader Lease"
    )
    group.add_argument(
        "--leader-election-lease-duration", type=positive_seconds, default=15.0, metavar="SECONDS"
    )
    group.add_argument(
        "--leader-election-renew-deadline", type=positive_seconds, default=10.0, metavar="SECONDS"
    )
    group.add_argument(
        "--leader-election-retry-period", type=positive_seconds, default=2.0, metavar="SECONDS"
    )
    group.add_argument(
        "--gateway-selector",
        default="",
        metavar="KEY=VALUE[,...]",
        help="labels of the gateway's pods (offload-sidecar --mode gateway): while a workload has no "
        "ready pod, its Service gets an EndpointSlice pointing at the ready ones; empty: no gateway, "
        "nothing stands in (default: empty)",
    )
    group.add_argument(
        "--gateway-namespace",
        default=os.environ.get("POD_NAMESPACE") or "default",
        help="namespace of the gateway's pods (default: $POD_NAMESPACE, else %(default)s)",
    )
    group.add_argument(
        "--gateway-ports",
        default=f"{standin.DEFAULT_PORTS[0]}-{standin.DEFAULT_PORTS[1]}",
        metavar="LOW-HIGH",
        help="the gateway ports handed out, one per ModelDeployment (default: %(default)s)",
    )


def positive_seconds(text: str) -> float:
    """argparse type: a number of seconds above zero, else an error naming the value."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than zero: {text!r}")
    return value


def gateway_settings(args: argparse.Namespace) -> standin.GatewaySettings | None:
    """The gateway of --gateway-*, or None without --gateway-selector. ValueError names the flag."""
    if not args.gateway_selector.strip():
        return None
    try:
        selector = standin.parse_selector(args.gateway_selector)
    except ValueError as exc:
        raise ValueError(f"--gateway-selector: {exc}") from None
    try:
        ports = standin.parse_ports(args.gateway_ports)
    except ValueError as exc:
        raise ValueError(f"--gateway-ports: {exc}") from None
    return standin.GatewaySettings(args.gateway_namespace, selector, ports)


def identity() -> str:
    """Unique per process: the pod's name (or host) and a random suffix."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


class Running:
    """The controller's threads; ``stop()`` ends them and releases the Lease."""

    def __init__(self, controller: Controller, elector: LeaderElector) -> None:
        self.controller = controller
        self.elector = elector

    def stop(self) -> None:
        self.controller.stop()
        self.elector.stop(release=True)


def watch_sink(cache: ClusterCache, store: Store) -> tuple[Fanout, tuple[str, ...]]:
    """One set of watches for both the admission cache and the controller's store."""
    return Fanout({cache: RESOURCES, store: CONTROLLER_RESOURCES}), CONTROLLER_RESOURCES


def start(
    args: argparse.Namespace,
    api_client: Any,
    store: Store,
    settings: ValidationSettings,
    *,
    evaluation: Evaluation | None = None,
    metrics: Any = None,
    release: bool | None = None,
) -> Running:
    controller_box: list[Controller] = []

    def started() -> None:
        if metrics is not None:
            metrics.leading(True)
        controller_box[0].enqueue_all()

    def stopped() -> None:
        if metrics is not None:
            metrics.leading(False)

    timing = Timing(
        args.leader_election_lease_duration,
        args.leader_election_renew_deadline,
        args.leader_election_retry_period,
    )
    elector = LeaderElector(
        api_client,
        args.leader_election_namespace,
        args.leader_election_lease,
        identity(),
        timing=timing,
        on_started=started,
        on_stopped=stopped,
    )
    options = Options(
        sidecar_cluster_role=args.sidecar_cluster_role,
        release=(args.controller == "off") if release is None else release,
        period=args.evaluation_period,
        validation=settings,
        signals_period=args.signals_period,
        gateway=gateway_settings(args),
    )
    controller = Controller(
        api_client, store, options, evaluation=evaluation, leading=elector.leading, metrics=metrics
    )
    controller_box.append(controller)
    controller.start()
    elector.start()
    log.info(
        "controller %s; leader election on Lease %s/%s as %s",
        "releasing (off)" if options.release else "on",
        elector.namespace,
        elector.name,
        elector.identity,
    )
    return Running(controller, elector)


def release_all(
    args: argparse.Namespace,
    api_client: Any,
    settings: ValidationSettings,
    *,
    timeout: float = 120.0,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """``--release-all``: hold the Lease, undo every ModelDeployment, exit still holding it.

    The Lease is taken over whoever holds it, with an hour's duration: the previous leader
    cannot renew and stops acting within its renew deadline (shorter than its lease
    duration, which is waited out before anything is done), and the webhook replicas that
    run until Helm deletes them stay followers and capture nothing again.
    """
    elector = LeaderElector(
        api_client,
        args.leader_election_namespace,
        args.leader_election_lease,
        identity() + "-release",
        timing=Timing(lease_duration=3600.0),
    )
    previous = elector.take_over()
    log.info(
        "holding Lease %s/%s; waiting %.0fs for the previous leader to stop",
        elector.namespace,
        elector.name,
        previous,
    )
    sleep(previous)
    store = Store(CONTROLLER_RESOURCES)
    options = Options(sidecar_cluster_role=args.sidecar_cluster_role, release=True, validation=settings)
    controller = Controller(api_client, store, options)
    sync = CacheSync(store, api_client, resources=CONTROLLER_RESOURCES)
    controller.start()
    sync.start()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if store.synced() and _released(store):
                log.info("every ModelDeployment released")
                return 0
            sleep(0.5)
        log.error("not every ModelDeployment was released within %.0fs", timeout)
        return 1
    finally:
        controller.stop()
        sync.stop()


def _released(store: Store) -> bool:
    for namespace in store.namespaces(MODELDEPLOYMENTS):
        for md in store.list(MODELDEPLOYMENTS, namespace):
            if FINALIZER in ((md.get("metadata") or {}).get("finalizers") or []):
                return False
    for namespace in store.namespaces(SERVICES):
        for service in store.list(SERVICES, namespace):
            owner = capture.captured_by(service)
            if owner and store.get(MODELDEPLOYMENTS, namespace, owner) is not None:
                return False
    for namespace in store.namespaces(ROLEBINDINGS):
        for binding in store.list(ROLEBINDINGS, namespace):
            labels = (binding.get("metadata") or {}).get("labels") or {}
            if labels.get(rbac.MANAGED_BY_LABEL) == rbac.MANAGED_BY:
                return False
    for namespace in store.namespaces(ENDPOINTSLICES):
        for endpoints in store.list(ENDPOINTSLICES, namespace):
            owner = ((endpoints.get("metadata") or {}).get("labels") or {}).get(standin.MODELDEPLOYMENT_LABEL)
            if owner and store.get(MODELDEPLOYMENTS, namespace, owner) is not None:
                return False
    return True
