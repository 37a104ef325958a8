"""A reply's text as its tokens come, with the request's stop strings (one `TextStream` per row), and
the bytes a single token stands for (for log-probs)."""
import functools
import re


class TextStream:
    """A reply's text as its tokens come: decodes every id so far and hands out the new suffix.

    Text is held back while it ends in an incomplete UTF-8 character ("\\ufffd") or in the start
    of a stop string; a stop string ends the reply (cut before it). Streaming and non-streaming
    replies are built from the same deltas, so they are the same text.
    """

    def __init__(self, tokenizer, stop=()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters handed out
        self.stopped = False

    def _holdback(self, text: str) -> int:
        """Where the text that may still change (an incomplete character, a stop string's start) begins."""
        end = len(text)
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        hold = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, end - self.sent), hold, -1):
                if text[end - size: end] == stop[:size]:
                    hold = size
                    break
        return max(end - hold, self.sent)

    def push(self, token: int) -> str:
        """The text the token adds that is safe to show; after a stop string, `stopped` is set."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            start = max(0, self.sent - max(len(s) for s in self.stop))
            cuts = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if cuts:
                self.stopped = True
                cut = max(min(cuts), self.sent)
                delta, self.sent = text[self.sent: cut], cut
                return delta
        end = self._holdback(text)
        delta, self.sent = text[self.sent: end], end
        return delta

    def flush(self) -> str:
        """The rest of the text once the reply has ended (held-back characters included)."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta, self.sent = text[self.sent:], len(text)
        return delta



@functools.lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (each byte as a printable character), reversed: character → byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    characters, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            characters[chr(byte)] = byte
        else:
            characters[chr(256 + extra)] = byte
            extra += 1
    return characters


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes one token stands for (a token may hold part of a UTF-8 character), as the hosted API's
    log-probs report them: byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2) and SentencePiece vocabularies."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if piece is None:
        return b""
    byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)  # SentencePiece's byte fallback
    if byte:
        return bytes([int(byte.group(1), 16)])
    decoder = _byte_level_decoder()
    if "▁" not in piece and all(character in decoder for character in piece):
        return bytes(decoder[character] for character in piece)
    return piece.replace("▁", " ").encode("utf-8")
