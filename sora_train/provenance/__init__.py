"""Provenance of what the project generates: C2PA Content Credentials, an invisible
watermark, and the check that reads both back.

Layer: beside ``data`` (uses ``utils`` and ``data.video_io``); ``training`` and ``cli`` use it.

- ``mark.write_generated_video``: the one function every generated video is written through
  (scrub prompts -> watermark -> encode with the AI-generated label -> C2PA sign -> write);
- ``sign``: signing identity from the environment, manifest, signing;
- ``watermark``: invisible-watermark payload embedding and detection;
- ``verify.inspect_file``: manifest validity, claims, watermark and a verdict.
"""

from sora_train.provenance.mark import (
    AI_LABEL,
    MarkReport,
    Provenance,
    default_provenance,
    mark_image_file,
    reset_default_provenance,
    write_generated_video,
)
from sora_train.provenance.verify import EXIT_CODES, FileReport, inspect_file

__all__ = [
    "AI_LABEL",
    "EXIT_CODES",
    "FileReport",
    "MarkReport",
    "Provenance",
    "default_provenance",
    "inspect_file",
    "mark_image_file",
    "reset_default_provenance",
    "write_generated_video",
]
