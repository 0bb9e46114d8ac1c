"""HTTP routes the pack adds to the host's server (read-only diagnostics)."""
import logging

from aiohttp import web

logger = logging.getLogger("IDFusion")
_registered = False


def register_routes() -> None:
    """``GET /idfusion/stats``: reference passes run and feature-cache hits, ConsistentID encodings and their
    cache hits, for users and tests."""
    global _registered
    if _registered:
        return
    try:
        from server import PromptServer
    except ImportError:  # imported outside a server process
        return
    if getattr(PromptServer, "instance", None) is None:
        return

    @PromptServer.instance.routes.get("/idfusion/stats")
    async def stats(request):
        from ..models.consistentid.face import ENCODINGS
        from ..models.feature_cache import FEATURE_CACHE
        return web.json_response({**FEATURE_CACHE.stats(), "consistentid_encodings": ENCODINGS.stats()})

    _registered = True
