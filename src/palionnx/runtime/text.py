"""Prompt construction and caption decoding with the folder's tokenizer.json (the `tokenizers` library)."""

from __future__ import annotations

import re
from pathlib import Path

from tokenizers import Tokenizer

from .contract import TOKENIZER_NAME
from .manifest import Manifest, ModelFolderError

_PLACEHOLDER = re.compile(r"(\{image\}|\{bos\})")
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")  # a byte-fallback piece


class TextCodec:
    """Turns prompts into PaliGemma input ids and generated ids back into text."""

    def __init__(self, folder: str | Path, manifest: Manifest):
        path = Path(folder) / TOKENIZER_NAME
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for every parse error
            reason = " ".join(str(exc).split())[:200]
            raise ModelFolderError(f"{path} is not a readable tokenizer ({reason}): copy or export the folder again") \
                from None
        self.manifest = manifest
        self.special_ids = {i for i, token in self.tokenizer.get_added_tokens_decoder().items() if token.special}
        self.byte_ids = {i for piece, i in self.tokenizer.get_vocab().items() if _BYTE_PIECE.fullmatch(piece)}

    def special_tokens_in(self, prompt: str) -> list[str]:
        """Special tokens (<image>, <bos>, <eos>, ...) that the tokenizer finds in a prompt's text."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        return [self.tokenizer.id_to_token(i) or str(i) for i in ids if i in self.special_ids]

    def unknown_characters(self, text: str) -> list[str]:
        """The distinct characters of `text` the tokenizer can only encode as <unk>."""
        unknown = self.tokenizer.token_to_id("<unk>")
        return list(dict.fromkeys(c for c in text if unknown in self.tokenizer.encode(c, add_special_tokens=False).ids))

    def prompt_ids(self, prompt: str) -> list[int]:
        """The manifest's prompt_template with `prompt` in it, as ids.

        `{image}` becomes image_seq_length image tokens and `{bos}` the bos token, wherever they stand;
        the text between them (with `{prompt}` replaced) is tokenized without special tokens. PaliGemma's
        template is "{image}{bos}{prompt}\\n", as PaliGemmaProcessor builds it.
        """
        m = self.manifest
        ids: list[int] = []
        for part in _PLACEHOLDER.split(m.prompt_template):
            if part == "{image}":
                ids += [m.image_token_id] * m.image_seq_length
            elif part == "{bos}":
                ids.append(m.bos_token_id)
            elif part:
                ids += self.tokenizer.encode(part.replace("{prompt}", prompt), add_special_tokens=False).ids
        return ids

    def decode(self, ids: list[int]) -> str:
        """Generated ids -> text, special tokens skipped."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class TextDeltas:
    """A caption's text as its tokens come, for streaming: `add(token)` returns the text it adds, `finish(text)`
    the rest of the final text, so that the pieces always add up to it. Text is given out only at a token with
    text of its own: after byte-fallback pieces (<0xNN>) it might change, because the decoder reads a run of
    bytes (special tokens, skipped, do not end one) as one UTF-8 sequence, and a byte that came out as a
    character alone can become part of another, or a replacement character."""

    def __init__(self, codec: TextCodec):
        self.codec = codec
        self.tokens: list[int] = []
        self.sent = ""

    def add(self, token: int) -> str:
        self.tokens.append(token)
        if token in self.codec.byte_ids or token in self.codec.special_ids or self.codec.tokenizer.id_to_token(token) \
                is None:  # a byte, or a token that decodes to nothing: a byte run can go on after it
            return ""
        text = self.codec.decode(self.tokens)
        if not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def finish(self, text: str) -> str:
        """What is left of the final `text` (`TextCodec.decode` of every token) after what `add` gave."""
        if not text.startswith(self.sent):  # cannot happen with prefix-stable decoding; said rather than hidden
            raise ValueError("the streamed text is not a prefix of the caption")
        rest, self.sent = text[len(self.sent):], text
        return rest
