"""`python -m trainer [verb] [overrides]` is `ftlab [verb] [overrides]`; the verb defaults to train."""
from trainer.cli import main

if __name__ == "__main__":
    main()
