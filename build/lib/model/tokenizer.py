"""LLaMA's SentencePiece tokenizer extended with the two special tokens of NxTP.

Ids: the base vocabulary (32000 for LLaMA-2), then ``<|image|>`` and the pad token
``<|empty|>`` (the paper's pad id -1 indexes that last row). The label delimiter and the
end of the prompt are read from the tokenizer, never hard-coded: the delimiter is the
piece "," as it follows a word (29892 in LLaMA-2; a lone ", " encodes to "▁," instead).
"""

from __future__ import annotations

import os

from model.config import IMAGE_TOKEN, PAD_TOKEN


class Tokenizer:
    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.n_base = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{path}: the tokenizer needs BOS and EOS ids")
        self.image_id = self.n_base
        self.pad_id = self.n_base + 1
        self.specials = {self.image_id: IMAGE_TOKEN, self.pad_id: PAD_TOKEN}
        self.delimiter_id = self._delimiter()

    def _delimiter(self) -> int:
        ids = self.sp.encode("word, word")
        pieces = [self.sp.id_to_piece(i) for i in ids]
        if "," not in pieces:
            raise ValueError(f"{self.path}: ',' after a word is not a piece of its own ({pieces})")
        return ids[pieces.index(",")]

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; special ids are written as their token strings."""
        out, run = [], []
        for i in ids:
            if i in self.specials:
                out.append(self.sp.decode(run))
                out.append(self.specials[i])
                run = []
            else:
                run.append(int(i))
        out.append(self.sp.decode(run))
        return "".join(out)

    def prompt_ids(self, template: str) -> list[int]:
        """``<|image|>``, BOS, then the template: the paper's order (its first two ids swapped)."""
        return [self.image_id, self.bos_id] + self.encode(template)
