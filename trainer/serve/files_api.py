"""`/v1/files`: upload, list, retrieve, download and delete files, as the hosted Files API.

An upload is streamed straight to `<jobs_root>/files/<file id>` (a name the server makes; the
client's filename is kept only as metadata) and refused past `server.max_upload_mb`. A half-sent
upload leaves nothing behind.
"""
import os
import re
import secrets
import time
from pathlib import Path
from typing import Literal, Optional

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from python_multipart.multipart import MultipartParser, parse_options_header

from trainer.serve.errors import APIError, not_found

router = APIRouter()
PURPOSES = ("fine-tune",)  # what a client may upload; result files are `fine-tune-results`, made by the server
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def new_file_id() -> str:
    """A file id shaped like the hosted API's: file- and 24 random alphanumerics."""
    return "file-" + "".join(secrets.choice(ALPHABET) for _ in range(24))


def file_object(row: dict) -> dict:
    """The hosted API's FileObject for an index row."""
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": row["status"],
            "expires_at": None, "status_details": None}


def clean_filename(name: str) -> str:
    """The client's filename as metadata only: its last path part, printable, at most 255 characters."""
    name = re.split(r"[\\/]", name or "")[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    return name[:255] or "upload.jsonl"


class _UploadSink:
    """Multipart callbacks: the `file` part goes to disk as it arrives, the other (small) fields to memory."""

    def __init__(self, destination: Path, max_bytes: int):
        self.destination, self.max_bytes = destination, max_bytes
        self.fields: dict[str, str] = {}
        self.filename: Optional[str] = None
        self.size = 0
        self._handle = None
        self._header_field, self._header_value = b"", b""
        self._headers: dict[bytes, bytes] = {}
        self._name: Optional[str] = None
        self._value = bytearray()

    def callbacks(self) -> dict:
        return {"on_part_begin": self.part_begin, "on_header_field": self.header_field,
                "on_header_value": self.header_value, "on_header_end": self.header_end,
                "on_headers_finished": self.headers_finished, "on_part_data": self.part_data,
                "on_part_end": self.part_end}

    def part_begin(self):
        self._headers, self._name, self._value = {}, None, bytearray()

    def header_field(self, data, start, end):
        self._header_field += data[start:end]

    def header_value(self, data, start, end):
        self._header_value += data[start:end]

    def header_end(self):
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field, self._header_value = b"", b""

    def headers_finished(self):
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = (options.get(b"name") or b"").decode("utf-8", "replace")
        if self._name == "file":
            if self._handle is not None:
                raise APIError(400, "Send one file per upload", param="file", code="invalid_request")
            self.filename = clean_filename((options.get(b"filename") or b"").decode("utf-8", "replace"))
            self._handle = open(self.destination, "wb")

    def part_data(self, data, start, end):
        if self._name == "file":
            self.size += end - start
            if self.size > self.max_bytes:
                raise APIError(413, f"File is over this server's upload limit of {self.max_bytes:,} bytes "
                               "(server.max_upload_mb)", param="file", code="file_too_large")
            self._handle.write(data[start:end])
        else:
            self._value += data[start:end]
            if len(self._value) > 4096:
                raise APIError(400, f"Form field '{self._name}' is too long", param=self._name, code="invalid_request")

    def part_end(self):
        if self._name == "file":
            self._handle.flush()
            os.fsync(self._handle.fileno())
        elif self._name:
            self.fields[self._name] = self._value.decode("utf-8", "replace")

    def close(self):
        if self._handle is not None:
            self._handle.close()


@router.post("/files")
async def upload_file(request: Request) -> dict:
    """POST /v1/files (multipart: file, purpose)."""
    server = request.app.state.server
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in options:
        raise APIError(400, "Upload files as multipart/form-data with fields 'file' and 'purpose'",
                       code="invalid_request")
    file_id = new_file_id()
    final = server.root / "files" / f"{file_id}.jsonl"
    partial = final.with_name(f".{final.name}.part")
    sink = _UploadSink(partial, server.cfg.server.max_upload_mb * 1024 * 1024)
    parser = MultipartParser(options[b"boundary"], sink.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
        sink.close()
        purpose = sink.fields.get("purpose")
        if sink.filename is None:
            raise APIError(400, "Missing the 'file' field", param="file", code="invalid_request")
        if purpose not in PURPOSES:
            raise APIError(400, f"purpose={purpose!r}: this server takes {', '.join(PURPOSES)} files",
                           param="purpose", code="invalid_purpose")
        if sink.size == 0:
            raise APIError(400, "The file is empty", param="file", code="empty_file")
    except BaseException as error:  # nothing of a refused or broken upload stays on disk
        sink.close()
        partial.unlink(missing_ok=True)
        if isinstance(error, (APIError, KeyboardInterrupt, SystemExit)) or not isinstance(error, Exception):
            raise
        raise APIError(400, f"Malformed multipart body: {error}", code="invalid_request") from None
    os.replace(partial, final)
    return file_object(server.index.add_file(file_id=file_id, purpose=purpose, filename=sink.filename,
                                             size=sink.size, path=final, created_at=int(time.time())))


@router.get("/files")
def list_files(request: Request, purpose: Optional[str] = None, limit: int = Query(10000, ge=1, le=10000),
               after: Optional[str] = None, order: Literal["asc", "desc"] = "desc") -> dict:
    """GET /v1/files: newest first by default, paged by `after` and `limit`."""
    rows, has_more = request.app.state.server.index.files(purpose=purpose, limit=limit, after=after, order=order)
    data = [file_object(row) for row in rows]
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


def get_file(request: Request, file_id: str) -> dict:
    """The index row of a file id, or 404."""
    row = request.app.state.server.index.file(file_id)
    if row is None:
        raise not_found("file", file_id, "file_id")
    return row


@router.get("/files/{file_id}")
def retrieve_file(request: Request, file_id: str) -> dict:
    """GET /v1/files/{file_id}."""
    return file_object(get_file(request, file_id))


@router.get("/files/{file_id}/content")
def file_content(request: Request, file_id: str):
    """GET /v1/files/{file_id}/content: the bytes, as uploaded (or the job's results CSV)."""
    row = get_file(request, file_id)
    path = Path(row["path"])
    if not path.is_file():
        raise APIError(404, f"The content of {file_id} is no longer on disk", param="file_id", code="file_not_found")
    media = "text/csv" if row["purpose"] == "fine-tune-results" else "application/octet-stream"
    return FileResponse(path, media_type=media, filename=row["filename"])


def _unfinished(server, job_id: str) -> bool:
    """Whether the job's record is not yet succeeded, failed or cancelled (the index may lag it a moment)."""
    from trainer.run import TERMINAL_STATUSES, Job

    try:
        return Job.load(Path(server.index.job(job_id)["run_dir"])).record.get("status") not in TERMINAL_STATUSES
    except (OSError, ValueError, TypeError):
        return True  # no readable record yet: still in use


@router.delete("/files/{file_id}")
def delete_file(request: Request, file_id: str) -> dict:
    """DELETE /v1/files/{file_id}: refused (409) while a job is being created from it or an unfinished job trains
    on it."""
    from trainer.serve.store import FileInUse

    server = request.app.state.server
    row = get_file(request, file_id)
    try:
        deleted = server.index.delete_file(file_id, unfinished=lambda job_id: _unfinished(server, job_id))
    except FileInUse as error:
        raise APIError(409, f"{file_id} is in use by {error.job_id or 'a job being created from it'}, which has not "
                       "finished; cancel it or wait", param="file_id", code="file_in_use") from None
    if not deleted:
        raise not_found("file", file_id, "file_id")  # deleted meanwhile by another request
    if row["purpose"] != "fine-tune-results":  # a results file is part of its job's record and stays there
        Path(row["path"]).unlink(missing_ok=True)
    return {"id": file_id, "object": "file", "deleted": True}
