"""The prompt templates of the pipelines: the contract with the training data.

A model answers best when it is asked exactly as it was taught. The shapes-world training data
(`fusion.data.shapes_world`) writes its user turns as

    captioning   "<image>\\nDescribe the image."
    VQA          "<image>\\n{question}"
    video QA     "<video>\\n{question}"

and the pipelines render their single user turn from these same templates (the `<image>` /
`<video>` marker is where the tokenizer puts the media's patch tokens). Change them only together
with the data a default model is trained on; `tests/pipelines` checks that they agree.
"""
from __future__ import annotations

from tokenizer import IMAGE_MARKER, VIDEO_MARKER, escape_markers

CAPTION_PROMPT = f"{IMAGE_MARKER}\nDescribe the image."
VQA_PROMPT = f"{IMAGE_MARKER}\n{{question}}"
VIDEO_QA_PROMPT = f"{VIDEO_MARKER}\n{{question}}"


def user_turn(template: str, **fields: str) -> list[dict]:
    """A one-turn conversation whose user content is `template` filled with `fields`; the fields are text (a
    question that mentions "<image>" asks about the text, the template's marker places the media)."""
    return [{"role": "user", "content": template.format(**{k: escape_markers(v) for k, v in fields.items()})}]
