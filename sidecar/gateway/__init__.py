"""``offload-sidecar --mode gateway``: the remote of each ModelDeployment whose workload has no ready pod.

A small Deployment (the chart's ``gateway``) runs this. It watches ModelDeployments and, for
each one whose status carries a gateway port (``status.standIn.port``, chosen by the
controller and the same for every gateway replica), listens on that port and sends every
request there to that ModelDeployment's remote (its own ``remoteBackend`` or the
installation's default) with the sidecar's data path, credentials (OAuth, headersFromSecrets,
caBundle), streaming and refusals. The port alone says which ModelDeployment a connection
is for: nothing the client sends is trusted for that. While the workload has no ready pod
the controller points the Service at these listeners with an EndpointSlice of its own
(``webhook/controller/standin.py``).

    ModelDeployments --watch--> listeners_from (pure) --> one Lane per ModelDeployment
                                                           RoutingTable -> ProxyServer :port
                                                           "local" = LocalPods (the hold)

listeners (what to listen for, pure), local (a lane's "local model": the Service's ready
pods, watched), lane (one ModelDeployment's listener), process (the Gateway and its admin
port), cli (the command line, ``offload-sidecar --mode gateway``).

Each Lane is the sidecar's own machinery (:class:`sidecar.app.Sidecar`: routing plan,
credential refreshers, ProxyServer) with two differences: every request goes to the remote
(the plan is 100%, always on), and the "local model" is :class:`~sidecar.gateway.local.LocalPods`: with no
cold-start hold, no backend at all (a request the remote cannot take gets the sidecar's 502);
with ``behavior.coldStartHoldSeconds`` N, the Service's own ready pods, waited for up to N
seconds, after which the request goes to the remote (the last backend left, as in the
sidecar). The pods are read from the Service's EndpointSlices (those of the EndpointSlice
controller, not the controller's stand-in slice), by the Service port's name
(``status.standIn.portName``).

Nothing is lost at a switch: when a local pod is ready again the controller removes its
slice and new connections go to the pods, while the listener stays open and finishes what
it has (it closes, draining as the sidecar does on SIGTERM, only when the ModelDeployment no
longer has a gateway port). On SIGTERM readiness fails at once (the controller takes this
pod out of every slice), new connections are accepted for the grace, and requests in
flight finish up to the deadline.
"""
