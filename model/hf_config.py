"""How ``transformers.AutoConfig`` reads an export's ``config.json`` (``model_type: nxtp``).

NxTP is not a ``transformers`` architecture (the whole model loads through
``NxTP.from_pretrained``), but tools that inspect a model folder start with
``AutoConfig.from_pretrained``. So that it answers instead of saying it does not know the
model type, every export carries this file as ``configuration_nxtp.py`` and names it in
``config.json``'s ``auto_map``: ``AutoConfig.from_pretrained(export, trust_remote_code=True)``
then works where this package is not installed, and gives the NxTP config (``.model``,
``.format_version``, ``.step``...) as attributes. :func:`register` makes the same call work
without ``trust_remote_code`` in a process that has this package.

This file is copied as it is: it imports nothing from this package.
"""

from transformers import PretrainedConfig

MODEL_TYPE = "nxtp"  # config.json's model_type (model/export.py writes it from here)


class NxTPHFConfig(PretrainedConfig):
    """An NxTP export's config.json as ``transformers`` sees it: every key kept as an attribute."""

    model_type = MODEL_TYPE


def register() -> None:
    """Let ``AutoConfig`` read ``model_type: nxtp`` without running the folder's copy of this file."""
    from transformers import AutoConfig

    AutoConfig.register(MODEL_TYPE, NxTPHFConfig, exist_ok=True)
