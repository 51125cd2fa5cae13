"""create_app and the lifespan that builds and tears down the services.

Start-up order: settings → base model → adapter layers injected → store →
adapter cache → engine thread → training worker. Shutdown reverses it after
draining in-flight requests.
"""

from __future__ import annotations

from fastapi import FastAPI

from server.api.errors import install_error_handlers
from server.api.routes import adapters, generate, health, openai, training
from server.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(title="loraplex", version="0.1.0")
    app.state.settings = settings
    install_error_handlers(app)
    for module in (health, generate, openai, adapters, training):
        app.include_router(module.router)
    return app
