"""`python -m trainer [overrides]` is `ftlab train [overrides]`."""
import sys

from trainer.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]] if len(sys.argv) < 2 or sys.argv[1] not in ("train", "validate", "estimate") else sys.argv[1:])
