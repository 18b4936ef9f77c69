"""The data path: the reverse proxy on the proxy port, one asyncio protocol per connection.

server (ProxyServer: listening, draining, timeouts) -> client (one per client
connection) -> exchange (one per request: route, attempts, fallback, the response
relayed back) -> upstream (pooled connections to the local model and the remote).
remote holds the remote's routes, pools and breakers; flow the reasons a connection
stops reading; types the Protocols by which the lower objects see the upper ones
(imports only go down). http1 holds the pure HTTP/1.1 rules, routing the pure
percentage spread, breaker the pure circuit breaker, stats the counters, settings
the timeouts and sizes. Nothing here knows where the decision comes from.

``python -m sidecar.proxy`` (sidecar.proxy.cli) runs the data path alone (benchmarks, tests).
"""
