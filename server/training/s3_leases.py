"""Job ownership across machines: one lease object per running job in the bucket, with an expiry.

    <prefix>/.jobs/<job_id>/lease.json   {"owner": "<process id>", "expires_at": <unix seconds>}

Why a lease and not a lock: servers on different machines share nothing but the
bucket, so "the owner is gone" can only mean "the owner stopped renewing".
Taking a lease is a conditional PUT: If-None-Match: * when there is none, If-Match
on the ETag of an expired one; of two servers racing, the store lets one win.
The owner renews (If-Match on its own last ETag) every third of the lease time.

Clocks: `expires_at` is the owner's wall clock. With clocks at most `skew_s`
apart, the owner stops trusting its lease `skew_s` before the expiry and others
take it over only `skew_s` after it, so the two never both believe they own it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass

from server.adapters.store.object_store import ObjectStore, PreconditionFailed
from server.errors import StoreUnavailable

log = logging.getLogger(__name__)

LEASE_NAME = "lease.json"


@dataclass
class Held:
    etag: str
    expires_at: float
    lost: bool = False


class LeaseBook:
    """The leases this process holds, and the conditional writes that take, renew and drop them."""

    def __init__(self, objects: ObjectStore, root: str, owner: str, lease_s: float, skew_s: float) -> None:
        """`root`: the key prefix job directories live under (`<prefix>/.jobs`)."""
        self.objects = objects
        self.root = root
        self.owner = owner
        self.lease_s = lease_s
        self.skew_s = skew_s
        self._held: dict[str, Held] = {}
        self._lock = threading.Lock()  # the dict
        self._renewing = threading.Lock()  # one conditional renewal at a time

    def _key(self, job_id: str) -> str:
        return f"{self.root}/{job_id}/{LEASE_NAME}"

    def _body(self) -> tuple[bytes, float]:
        expires_at = time.time() + self.lease_s
        return json.dumps({"owner": self.owner, "expires_at": expires_at}).encode(), expires_at

    def held_ids(self) -> set[str]:
        with self._lock:
            return set(self._held)

    def take(self, job_id: str) -> bool:
        """Create the job's lease, or take over an expired one; False when another owner holds it live."""
        body, expires_at = self._body()
        try:
            etag = self.objects.put(self._key(job_id), body, if_absent=True)
        except PreconditionFailed:
            got = self.objects.get(self._key(job_id))
            if got is None:
                return False  # released meanwhile: the next look may take it
            current, current_etag = _parse(got[0]), got[1]
            if current is not None and time.time() <= current[1] + self.skew_s:
                return False
            log.info("training job %s: lease of %s expired; taking it over", job_id,
                     current[0] if current else "an unreadable owner")
            body, expires_at = self._body()
            try:
                etag = self.objects.put(self._key(job_id), body, if_match=current_etag)
            except PreconditionFailed:
                return False  # another server took it first
        with self._lock:
            self._held[job_id] = Held(etag, expires_at)
        return True

    def holds(self, job_id: str, fresh: bool = False) -> bool:
        """Ours, not lost, and valid on our clock. `fresh` (before publishing) renews it now: the
        conditional write proves no one took it, and the publish that follows gets a whole lease."""
        with self._lock:
            held = self._held.get(job_id)
        if held is None or held.lost or time.time() >= held.expires_at - self.skew_s:
            return False
        return self._renew(job_id, held) if fresh else True

    def renew(self) -> None:
        """One heartbeat: extend every lease held; one another server has taken is marked lost."""
        with self._lock:
            held = dict(self._held)
        for job_id, lease in held.items():
            try:
                self._renew(job_id, lease)
            except StoreUnavailable:
                log.warning("training job %s: lease not renewed (store unreachable)", job_id)

    def _renew(self, job_id: str, lease: Held) -> bool:
        """If-Match on our last ETag; one at a time, so the heartbeat and a publish's check never
        race each other's ETag. StoreUnavailable: the caller's."""
        with self._renewing:
            if lease.lost:
                return False
            body, expires_at = self._body()
            try:
                etag = self.objects.put(self._key(job_id), body, if_match=lease.etag)
            except PreconditionFailed:
                log.warning("training job %s: lease lost to another server; this server stops it", job_id)
                lease.lost = True
                return False
            lease.etag, lease.expires_at = etag, expires_at
            return True

    def release(self, job_id: str) -> None:
        """Drop our lease (after the job's record says where it stands); a lost one is not ours to delete."""
        with self._lock:
            held = self._held.pop(job_id, None)
        if held is None or held.lost:
            return
        got = self.objects.get(self._key(job_id))
        current = _parse(got[0]) if got is not None else None
        if current is not None and current[0] == self.owner:
            self.objects.delete([self._key(job_id)])

    def forget(self, job_id: str) -> None:
        """Stop renewing without touching the object: it expires, and the job is taken over (counted)."""
        with self._lock:
            self._held.pop(job_id, None)


def _parse(data: bytes) -> tuple[str, float] | None:
    """(owner, expires_at), or None for an object this server did not write (taken over as expired)."""
    try:
        raw = json.loads(data)
        return str(raw["owner"]), float(raw["expires_at"])
    except (ValueError, KeyError, TypeError):
        return None
