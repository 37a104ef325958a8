"""`ftlab serve`: the hosted fine-tuning API (files, jobs, events, checkpoints, models, chat and
completions) on this machine, for code written against the official `openai` client."""
