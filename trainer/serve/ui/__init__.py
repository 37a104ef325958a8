"""The dashboard of `ftlab serve`: pages at `/`, `/jobs/<id>`, `/new`, `/playground`, `/files`, their assets
under `/static`, and a few dashboard-only JSON endpoints under `/ui/api` (behind the API's key check;
`is_page` tells the check which paths are pages).

The pages are HTML shells with no data in them; their scripts read everything through the same API a
client uses (`/v1/...`) plus `/ui/api/...`, which answers from the same records: the index, the run
directories and the library's own validation and estimate functions.
"""
from fastapi import APIRouter

from trainer.serve.ui import api, pages
from trainer.serve.ui.pages import is_page

__all__ = ["is_page", "router"]

router = APIRouter()
router.include_router(pages.router)
router.include_router(api.router)
