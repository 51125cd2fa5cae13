"""Which adapter a request is for, as Ray Serve's multiplexed model id: `<tenant>/<adapter_id>`.

The id carries the tenant because two tenants' adapters of one name are two
different adapters (and a replica's residency is keyed by both). It is read
from where the API puts it: `adapter_id` in a /generate body, `model` in an
OpenAI body (the base model's id means no adapter), the path of
/v1/adapters/{id}/... (an upload lands on the replica that will serve it, and
a merge on one that already holds it). An admin's `?tenant=` names the owner.
Anything unreadable gives no id: the request goes to the least-loaded replica,
whose app then answers exactly as a single server would (a 4xx, a 401).
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs

from server.adapters.ids import is_valid_name
from server.api.keys import ApiKeys, authenticate
from server.cluster.bridge import RequestHead

MAX_ROUTED_BODY = 4 * 1024 * 1024  # generation bodies are small; larger ones are routed without reading
BODY_FIELDS = {"/generate": "adapter_id", "/v1/completions": "model", "/v1/chat/completions": "model"}
ADAPTERS_PREFIX = "/v1/adapters/"


def affinity_id(head: RequestHead, body: bytes, keys: ApiKeys | None, base_model_id: str) -> str:
    """`tenant/adapter` for a request about one adapter, else "" (any replica)."""
    adapter_id = _adapter_of(head, body)
    if adapter_id is None or adapter_id == base_model_id or not is_valid_name(adapter_id):
        return ""
    principal = authenticate(keys, head.headers)
    if principal is None:
        return ""
    tenant = principal.tenant
    if principal.admin:
        asked = parse_qs(head.query_string.decode("latin-1")).get("tenant")
        tenant = asked[0] if asked else tenant
    return f"{tenant}/{adapter_id}" if is_valid_name(tenant) else ""


def _adapter_of(head: RequestHead, body: bytes) -> str | None:
    field = BODY_FIELDS.get(head.path)
    if field is not None and head.method == "POST":
        if len(body) > MAX_ROUTED_BODY:
            return None
        try:
            value = json.loads(body).get(field)
        except (ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else None
    if head.path.startswith(ADAPTERS_PREFIX):
        return head.path[len(ADAPTERS_PREFIX):].split("/", 1)[0] or None
    return None


def split_id(model_id: str) -> tuple[str, str] | None:
    """(tenant, adapter_id) of a multiplexed id this module made; None for any other string."""
    tenant, sep, adapter_id = model_id.partition("/")
    return (tenant, adapter_id) if sep and is_valid_name(tenant) and is_valid_name(adapter_id) else None
