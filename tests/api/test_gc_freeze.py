"""The server process freezes its start-up objects out of the cyclic GC; an app embedded elsewhere does not.

Why it matters: a full collection walks every live object (model, tokenizer,
app) and pauses the process ~0.2 s on CPU, inside adapter loads and engine steps.
"""

from __future__ import annotations

import gc

from server.app import create_app
from tests.harness import running_server


def test_server_entry_point_freezes_startup_objects(tiny_settings) -> None:
    gc.unfreeze()
    app = create_app(tiny_settings)
    app.state.freeze_gc = True  # what `loraplex serve` sets (server/cli.py)
    try:
        with running_server(app):
            assert gc.get_freeze_count() > 10_000  # the model's modules, tensors, tokenizer, app
    finally:
        gc.unfreeze()


def test_embedded_app_leaves_the_host_process_gc_alone(tiny_settings) -> None:
    gc.unfreeze()
    with running_server(create_app(tiny_settings)):
        assert gc.get_freeze_count() == 0
