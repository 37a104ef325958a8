"""The dashboard's pages and assets. A page is `templates/layout.html` around `templates/<page>.html`,
with `static/js/<page>.js` as its script; it holds no data (the script fetches it, sending the API key),
so the pages themselves are served without the key."""
import html
from pathlib import Path
from string import Template

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse

from trainer.serve.errors import APIError

router = APIRouter(include_in_schema=False)
HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
TEMPLATES = HERE / "templates"
NAV = (("jobs", "/", "Jobs"), ("new", "/new", "New job"), ("playground", "/playground", "Playground"),
       ("files", "/files", "Files"))
MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".png": "image/png",
               ".txt": "text/plain", ".ico": "image/x-icon"}
# nothing from another origin, no inline script: the pages work offline and data cannot become code
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def asset_version() -> str:
    """Appended to asset URLs so a browser never mixes an old script with a new page."""
    from importlib import metadata

    try:
        return metadata.version("ftlab")
    except metadata.PackageNotFoundError:
        return "dev"


def is_page(path: str) -> bool:
    """Whether a path is one of the dashboard's pages or assets, which hold no data and are served without the key."""
    return any(route.path_regex.fullmatch(path) for route in router.routes)


def render(page: str, title: str) -> HTMLResponse:
    nav = "\n".join(f'<li><a href="{href}"{" aria-current=page" if name == page else ""}>{label}</a></li>'
                    for name, href, label in NAV)
    body = Template((TEMPLATES / "layout.html").read_text(encoding="utf-8")).substitute(
        title=html.escape(title), nav=nav, main=(TEMPLATES / f"{page}.html").read_text(encoding="utf-8"),
        page=page, version=asset_version())
    return HTMLResponse(body, headers=SECURITY_HEADERS)


@router.get("/")
def jobs_page():
    return render("jobs", "Fine-tuning jobs")


@router.get("/jobs/{job_id}")
def job_page(job_id: str):
    return render("job", "Fine-tuning job")


@router.get("/new")
def new_job_page():
    return render("new", "New fine-tuning job")


@router.get("/playground")
def playground_page():
    return render("playground", "Playground")


@router.get("/files")
def files_page():
    return render("files", "Files")


@router.get("/static/{path:path}")
def static(path: str):
    """A file of the dashboard's assets (never anything outside `static/`)."""
    try:
        target = (STATIC / path).resolve()
        found = target.is_relative_to(STATIC) and target.is_file()
    except (OSError, ValueError):  # a NUL byte, a name too long
        found = False
    if not found:
        raise APIError(404, f"No such asset: /static/{path}", code="not_found")
    return FileResponse(target, media_type=MEDIA_TYPES.get(target.suffix, "application/octet-stream"),
                        headers=SECURITY_HEADERS)
