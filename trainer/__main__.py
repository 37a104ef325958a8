"""`python -m trainer [verb] [overrides]` is `ftlab [verb] [overrides]`; the verb defaults to train."""
from trainer.cli import run

if __name__ == "__main__":
    run()
