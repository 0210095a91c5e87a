"""Names of the datasets read through loader workers (``imagefolder``, ``hf:OWNER/NAME``); no heavy imports."""

from __future__ import annotations

import re

from bench.errors import UserError

DEFAULT_IMAGE_SIZE = 224
HF_PREFIX = "hf:"


class DataError(UserError):
    """A user-facing data problem. The message is a single line saying what was
    looked for, where, and how to get it."""

    def __init__(self, message: str):
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", str(message)).strip())


# -- names ---------------------------------------------------------------------------------------


def loader_dataset_name(name: str) -> str | None:
    """``"imagefolder"`` or ``"hf:OWNER/NAME"`` (the prefix and ``image-folder`` in any spelling);
    None for any other name. A hub id keeps its case."""
    text = str(name).strip()
    if text[: len(HF_PREFIX)].lower() == HF_PREFIX:
        repo = text[len(HF_PREFIX) :].strip()
        parts = repo.split("/")
        if len(parts) != 2 or not all(parts) or any(c.isspace() for c in repo):
            raise DataError(f"--dataset {text!r}: expected hf:OWNER/NAME, a Hugging Face Hub dataset id")
        return HF_PREFIX + repo
    if "".join(ch for ch in text.lower() if ch.isalnum()) == "imagefolder":
        return "imagefolder"
    return None


def is_loader_dataset(name: str) -> bool:
    try:
        return loader_dataset_name(name) is not None
    except DataError:
        return True
