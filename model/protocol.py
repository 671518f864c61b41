"""Which protocol a job follows: this project's (``nxtp``, the default) or the released code's (``reference``).

The released NxTP code (github.com/kaiyuyue/nxtp) differs from this project in a few
deliberate places; ``reference`` reproduces it where this project differs. Each module
applies its own part and cites the reference function it mirrors:

- training mask, ``model.prompt.label_segments`` (``src/models/lang.py``,
  ``LLaMATransformer.forward``): the last label sees only the prefix;
- label extraction, ``pipeline.nouns`` (``src/utils.py``, ``filter_input_text`` and
  ``get_noun_words``): noise words removed as substrings, characters deleted, lemma
  duplicates kept;
- scoring, ``pipeline.scoring.LabelScorer`` (``src/evals/engine.py``, ``evaluate``, and
  ``src/evals/metrics.py``, ``SemanticFScore.update``): blank and repeated predictions
  kept in the top-k, an empty top-k scored as one blank label.

The README's "The reference's protocol" section lists them side by side.
"""

from __future__ import annotations

from typing import Literal

ProtocolName = Literal["nxtp", "reference"]
PROTOCOLS: tuple[str, ...] = ("nxtp", "reference")
DEFAULT_PROTOCOL = "nxtp"


def check_protocol(protocol: str) -> str:
    """``protocol`` itself, or a ValueError naming the choices."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}: choose {' or '.join(PROTOCOLS)}")
    return protocol
