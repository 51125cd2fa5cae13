"""Routes: openai (thin handlers; work happens in the engine / store / jobs)."""

from fastapi import APIRouter

router = APIRouter()
