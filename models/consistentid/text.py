"""ConsistentID's text side, as the official code builds it with LLaVA disabled.

The fixed caption "The person has one face, one nose, two eyes, two ears, and one mouth." is
rewritten by ``process_text_with_markers``: each noun of a region that was found is followed by
the added token ``<|facial|>`` and the phrases are reordered face, ears, eyes, nose, mouth, e.g.
"The person has one face <|facial|>, two ears <|facial|>, two eyes <|facial|>, one nose
<|facial|>, and one mouth <|facial|>," (``facial_caption`` gives that string for any set of
regions; it equals the official function's output for all 31 of them).

``prompt_face = prompt + "Detail:" + caption``; when that is longer than 77 tokens (each marker
counts one) it becomes ``"Detail:" + caption + " Caption:" + prompt``. Tokenising deletes each
marker and marks the token before it (the noun); positions count BOS as 0. The facial branch
encodes the marker-free ids (77: padded with the end token, or cut without a new EOS) with the
checkpoint's CLIP and overwrites the marked rows through the fuse module. The text-only branch
encodes the marker-free string as the pipeline encodes any prompt (truncated to 77, EOS kept).

Pairing is positional: the k-th marked noun in text order takes the k-th region vector in region
order (Face, Eye, Ear, Nose, Lip). With eyes and ears both present the noun "ears" gets the eye
region and "eyes" the ear region; ConsistentID was trained with this pairing, so it is kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MARKER = "<|facial|>"
LENGTH = 77
#: (region, noun, the caption's phrase) in the order the rewritten caption lists them.
PHRASES = (("Face", "face", "The person has one face"), ("Ear", "ears", "two ears"), ("Eye", "eyes", "two eyes"),
           ("Nose", "nose", "one nose"), ("Lip", "mouth", "and one mouth"))


def facial_caption(regions) -> str:
    """The rewritten caption with a marker after the noun of every region in ``regions``."""
    return " ".join(f"{phrase} {MARKER}," for region, _, phrase in PHRASES if region in regions)


def pairing(regions: tuple) -> list[tuple[str, str]]:
    """(noun, region whose vector it receives) for each marked noun, in text order."""
    return list(zip([noun for region, noun, _ in PHRASES if region in regions], regions))


@dataclass(frozen=True)
class PromptTokens:
    """prompt_face: the string with markers; facial_ids [77] with marks (positions of the marked
    nouns); text_only_ids [77]: the marker-free string as a plain prompt."""

    prompt_face: str
    facial_ids: tuple
    marks: tuple
    text_only_ids: tuple


class Tokenizer:
    """ComfyUI's CLIP-L tokenizer of a CLIP object, used on raw text (no weight syntax)."""

    def __init__(self, clip):
        sd_tokenizer = getattr(clip.tokenizer, getattr(clip.tokenizer, "clip", ""), None)
        if sd_tokenizer is None or getattr(sd_tokenizer, "start_token", None) is None:
            raise ValueError("this CLIP has no SD1.5-style CLIP-L tokenizer")
        self.name = clip.tokenizer.clip_name
        self.hf = sd_tokenizer.tokenizer
        self.start, self.end, self.pad = sd_tokenizer.start_token, sd_tokenizer.end_token, sd_tokenizer.pad_token

    def words(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS."""
        return list(self.hf(text)["input_ids"][1:-1])

    def prompt(self, text: str) -> list[int]:
        """[77]: BOS, the tokens (at most 75), EOS, padding — the pipeline's ``_encode_prompt``."""
        ids = [self.start] + self.words(text)[:LENGTH - 2] + [self.end]
        return ids + [self.pad] * (LENGTH - len(ids))

    def with_marks(self, text: str) -> tuple[list[int], list[int]]:
        """All ids (BOS … EOS, no markers, not cut) and the positions of the tokens before each marker."""
        ids, marks = [self.start], []
        pieces = text.split(MARKER)
        for i, piece in enumerate(pieces):
            ids += self.words(piece)
            if i < len(pieces) - 1:
                marks.append(len(ids) - 1)
        return ids + [self.end], marks


def prompt_tokens(tokenizer: Tokenizer, prompt: str, regions: tuple) -> PromptTokens:
    caption = facial_caption(regions)
    prompt_face = prompt + "Detail:" + caption
    ids, marks = tokenizer.with_marks(prompt_face)
    if len(ids) + len(marks) > LENGTH:
        prompt_face = "Detail:" + caption + " Caption:" + prompt
        ids, marks = tokenizer.with_marks(prompt_face)
    facial = (ids + [tokenizer.pad] * LENGTH)[:LENGTH]
    return PromptTokens(prompt_face, tuple(facial), tuple(m for m in marks if m < LENGTH),
                        tuple(tokenizer.prompt(prompt_face.replace(MARKER, ""))))


def encode_ids(clip, tokenizer: Tokenizer, ids) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The CLIP's hidden states [1, 77, C] (its configured layer; last + final LayerNorm by default)
    and pooled output of exactly these ids."""
    out = clip.encode_from_tokens({tokenizer.name: [[(int(i), 1.0) for i in ids]]}, return_pooled=True,
                                  return_dict=True)
    return out["cond"].float().cpu(), out.get("pooled_output")


def fuse(fuse_module, hidden: torch.Tensor, marks: tuple, vectors: torch.Tensor) -> torch.Tensor:
    """hidden [1, 77, C] with the marked rows replaced by fuse(row, vector): k-th mark, k-th vector."""
    if not marks:
        return hidden
    param = next(fuse_module.parameters())
    rows = hidden[0, list(marks)].to(param.device, param.dtype)
    with torch.no_grad():
        fused = fuse_module(rows, vectors[:len(marks)].to(param.device, param.dtype))
    out = hidden.clone()
    out[0, list(marks)] = fused.float().cpu()
    return out
