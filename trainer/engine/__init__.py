"""ftlab's decoding engine: continuous batching of many requests, with many adapters, over one backbone.

`ftlab serve`, `ftlab chat`, `ftlab eval` and reinforcement fine-tuning's rollouts all generate
through it. See `engine.py` for how a step runs, `cache.py` for the KV layout, `lora.py` for
mixed-adapter batches and `sampling.py` for per-row sampling.
"""
from trainer.engine.engine import (
    Adapter,
    Choice,
    Delta,
    Engine,
    EngineClosed,
    Generation,
    QueueFull,
    Request,
)
from trainer.engine.lora import UnsupportedAdapter
from trainer.engine.sampling import MAX_TOP_LOGPROBS, Sampling, TokenLogprob
from trainer.engine.text import TextStream, token_bytes

__all__ = ["Adapter", "Choice", "Delta", "Engine", "EngineClosed", "Generation", "MAX_TOP_LOGPROBS", "QueueFull",
           "Request", "Sampling", "TextStream", "TokenLogprob", "UnsupportedAdapter", "token_bytes"]
