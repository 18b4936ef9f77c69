"""The data path: the reverse proxy on the proxy port, one asyncio protocol per connection.

server (ProxyServer, routes, breakers) -> client (one per client connection) -> exchange
(one per request: route, attempts, fallback) -> response (the answer relayed back) and
upstream (pooled connections to the local model and the remote). http1 holds the pure
HTTP/1.1 rules, routing the pure percentage spread, breaker the pure circuit breaker,
stats the counters. Nothing here knows where the decision comes from.

``python -m sidecar.proxy`` runs the data path alone (benchmarks, tests).
"""
