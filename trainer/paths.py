"""Where things live: bundled samples, the cache, run directories."""
from pathlib import Path

SAMPLES_DIR = Path(__file__).parent / "samples"
SAMPLE_SCHEME = "sample://"


def resolve_data_path(path: str) -> Path:
    """Turn a data path from config into a filesystem path.

    ``sample://json_output/train.jsonl`` names a file bundled with ftlab; anything else is a
    path relative to the directory ftlab was started from (or absolute).
    """
    if path.startswith(SAMPLE_SCHEME):
        return SAMPLES_DIR / path[len(SAMPLE_SCHEME):]
    return Path(path).expanduser()


def cache_dir(configured: str) -> Path:
    """The ftlab cache folder (converted backbones, tokenized data), created if missing."""
    folder = Path(configured).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    return folder
