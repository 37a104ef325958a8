"""No server path leaves the server: what the API shows of a job's record, with paths made relative.

A job's events and error messages are written for `ftlab jobs …` on this machine and may name
places on its disk: a checkpoint folder, a data file, a library's message about a file it could not
read. The API shows the same text with every such path replaced: one inside the job's run dir by
its run-dir-relative name, an uploaded file by its stored name (`file-….jsonl`), anything else
under the jobs root by `jobs_root/…`, and the server's home directory by `~`.
"""
import re
from pathlib import Path


def _replacements(root: Path, run_dir: Path) -> list[tuple[str, str]]:
    pairs = []
    for path, shown in ((run_dir, "."), (root / "files", "."), (root, "jobs_root"), (Path.home(), "~")):
        for form in {str(path), str(Path(path).resolve())}:
            if form not in ("", "/", "."):
                pairs.append((form, shown))
    return sorted(pairs, key=lambda pair: -len(pair[0]))  # the most specific first


def _scrub_text(text: str, pairs: list[tuple[str, str]]) -> str:
    for path, shown in pairs:
        # the path itself, or followed by `/…`; not a longer name that starts the same (`/root` in `/rootfs`)
        pattern = re.escape(path) + r"(/|(?![\w.-]))"
        text = re.sub(pattern, lambda match: "" if shown == "." and match.group(1) == "/" else
                      shown + match.group(1), text)
    return text


def public_value(value, root: Path, run_dir: Path):
    """`value` (text, or lists and dicts of it) as the API may show it: server paths replaced."""
    pairs = _replacements(Path(root), Path(run_dir))

    def scrub(item):
        if isinstance(item, str):
            return _scrub_text(item, pairs)
        if isinstance(item, dict):
            return {key: scrub(inner) for key, inner in item.items()}
        if isinstance(item, list):
            return [scrub(inner) for inner in item]
        return item

    return scrub(value)
