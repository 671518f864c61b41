"""A LLaMA-2-sized stand-in tokenizer for the benchmarks, where LLaMA-2's own is not at hand.

    python -m benchmarks.stand_in_tokenizer OUT.model [--pieces 32000]

LLaMA-2's ``tokenizer.model`` cannot be downloaded without accepting Meta's license, and the
benchmarks' published shapes need its 32,000-piece output layer. This writes the synthetic
world's byte-fallback BPE tokenizer (``pipeline.synthetic.train_tokenizer``: LLaMA's special
ids, "," as its own piece) padded with UNUSED pieces up to ``--pieces``: the same output
layer size, the same sequence lengths within a few tokens on the synthetic captions. The
benchmarks' results record which tokenizer they ran with.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile


def build(out: str, pieces: int = 32000, base: str | None = None) -> str:
    """Write ``base`` (default: a fresh synthetic world's tokenizer) padded to ``pieces`` to ``out``."""
    from sentencepiece import sentencepiece_model_pb2 as spb

    from pipeline import synthetic
    from pipeline.outputs import write_bytes

    with tempfile.TemporaryDirectory() as tmp:
        base = base or synthetic.write_world(os.path.join(tmp, "world"), 64, 8, seed=0).tokenizer
        with open(base, "rb") as f:
            proto = spb.ModelProto.FromString(f.read())
    have = len(proto.pieces)
    if have > pieces:
        raise ValueError(f"the synthetic tokenizer already has {have} pieces, more than {pieces}")
    for i in range(pieces - have):
        piece = proto.pieces.add()
        piece.piece = f"<unused{i}>"
        piece.score = 0.0
        piece.type = spb.ModelProto.SentencePiece.UNUSED
    write_bytes(out, proto.SerializeToString())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stand_in_tokenizer", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="where to write the .model file")
    p.add_argument("--pieces", type=int, default=32000, help="pieces in all (LLaMA-2: 32000)")
    args = p.parse_args(argv)
    build(args.out, args.pieces)
    from model.tokenizer import Tokenizer

    tok = Tokenizer(args.out)
    print(f"wrote {args.out}: {tok.n_base} pieces, bos {tok.bos_id}, eos {tok.eos_id}, ',' {tok.delimiter_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
