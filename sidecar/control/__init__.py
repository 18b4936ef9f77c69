"""The control core: what the sidecar's sources must provide (interfaces), how a
configuration and a decision become a routing plan (plan), cluster mode's decision read
from the status (published), the offloading state that holds them and publishes the plan
(state), and the snapshot the admin port renders (view). No sockets, no files; clocks
are passed in."""
