"""What a model says about one image: the result every predict path returns, and the refusal
of inputs that are no pictures, which needs no model (nor torch) to say."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .images import BadImage, decode_image, read_file

# The check decodes a JPEG at 1/8 scale (a few ms even for 12 megapixels): still all of its
# data, so a truncated file fails here as it would in the model's own decode.
CHECK_DRAFT = 32


@dataclass(frozen=True)
class Prediction:
    file: str
    label: str | None
    confidence: float | None
    probs: dict[str, float] = field(default_factory=dict)
    error: str | None = None    # set, and the rest empty, when this one image could not be read
    unknown: bool = False       # unlike the model's own photos: "none of these" (label is still the closest)

    def to_dict(self) -> dict:
        out = {"file": self.file, "label": self.label, "confidence": self.confidence, "probs": self.probs,
               "unknown": self.unknown}
        if self.error:
            out["error"] = self.error
        return out


def refused(payloads: Sequence[bytes], names: Sequence[str]) -> list[Prediction] | None:
    """Each input's error when not one of them decodes as a picture, else None: then the model
    has work, and it reports the bad ones among the rest itself. Stops at the first good one."""
    said = []
    for data, name in zip(payloads, names):
        try:
            decode_image(data, draft_size=CHECK_DRAFT)
        except BadImage as exc:
            said.append(Prediction(name, None, None, error=str(exc)))
        else:
            return None
    return said


def refused_files(files: Sequence[str | Path]) -> list[Prediction] | None:
    """refused() for files, a file that cannot be read being refused too."""
    said = []
    for file in files:
        try:
            refusal = refused([read_file(file)], [str(file)])
        except BadImage as exc:  # cannot be read
            refusal = [Prediction(str(file), None, None, error=str(exc))]
        if refusal is None:
            return None
        said.extend(refusal)
    return said
