"""`sluice verify`: does the running stack do what its config says? Each knob of each service is probed from the
outside, as a client and an operator see it (the gateway's answers, its /metrics, Triton's metrics and statistics),
and given a verdict: pass, fail, or n/a where this model cannot make the knob act (say so, never guess).

``probes.py`` holds one function per knob; ``traffic.py`` the clients and request shapes; ``observe.py`` the reading
of metrics; ``report.py`` the table and the JSON.
"""
