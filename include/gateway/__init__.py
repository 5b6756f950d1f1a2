"""The reference model gateway: routes predictions between a stable and a canary version and logs them.

Run it with `python -m gateway --model-dir DIR --db-url URL --host 127.0.0.1 --port N`; the admin token comes from
the environment variable `CANARY_GATEWAY_TOKEN`. See docs/gateway.md.
"""

from gateway.routing import Assignment, Route, assign, bucket_of

__all__ = ["Assignment", "Route", "assign", "bucket_of"]
