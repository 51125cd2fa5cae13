"""Dedicated (merged) adapters on every replica: each follows the store's `.merged` markers.

Why every replica and not one: the router sends an adapter's requests to the
replicas that hold it, and under load to any other; a dedicated tenant must get
its merged copy wherever it lands. A merge request is served by one replica
(which writes the marker); the others build their copies within a
`REPORT_EVERY_S` poll. Un-merging removes the marker and the others follow.
A replica never writes markers while following, so it cannot undo a change it
has not seen; it undoes only dedications whose marker it saw and then lost.
"""

from __future__ import annotations

import asyncio
import logging

from server.adapters.merge.merge import MergeRegistry, Pair
from server.errors import ApiError

log = logging.getLogger(__name__)


class MergeFollower:
    def __init__(self, merge: MergeRegistry) -> None:
        self.merge = merge
        self._seen: set[Pair] = set()
        self._refused: set[Pair] = set()  # asked again only once its marker goes and comes back

    async def sync(self) -> None:
        marked = await asyncio.to_thread(self.merge.marked)
        dedicated = self.merge.dedicated()
        self._refused &= marked
        for tenant, adapter_id in sorted(marked - dedicated - self._refused):
            try:
                await self.merge.dedicate(tenant, adapter_id, mark=False)
            except ApiError as e:  # e.g. max_merged reached here: served unmerged, within float tolerance
                self._refused.add((tenant, adapter_id))
                log.warning("not following the merge of %s/%s: %s", tenant, adapter_id, e.message)
        for tenant, adapter_id in sorted((self._seen - marked) & dedicated):
            await self.merge.undedicate(tenant, adapter_id, mark=False)
        self._seen = marked
