"""Scale-out: the same app as N Ray Serve replicas behind one ingress (see docs/ARCHITECTURE.md, "Cluster").

Only server.cli imports this package, and only when `--replicas` > 1 or a Ray
address is given: the single-process server never imports Ray.
"""
