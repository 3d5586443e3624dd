"""Prompt construction and caption decoding with the folder's tokenizer.json (the `tokenizers` library)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from .manifest import TOKENIZER_NAME, Manifest


class TextCodec:
    """Turns prompts into PaliGemma input ids and generated ids back into text."""

    def __init__(self, folder: str | Path, manifest: Manifest):
        self.tokenizer = Tokenizer.from_file(str(Path(folder) / TOKENIZER_NAME))
        self.manifest = manifest

    def prompt_ids(self, prompt: str) -> list[int]:
        """`<image>` * image_seq_length + `<bos>` + prompt + newline, as PaliGemmaProcessor builds it."""
        m = self.manifest
        # The template is "{image}{bos}" followed by the text part, e.g. "{prompt}\n".
        text_part = m.prompt_template.split("{bos}", 1)[1].replace("{prompt}", prompt)
        text = self.tokenizer.encode(text_part, add_special_tokens=False).ids
        return [m.image_token_id] * m.image_seq_length + [m.bos_token_id] + text

    def decode(self, ids: list[int]) -> str:
        """Generated ids -> text, special tokens skipped."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)
