"""Sentences of a traced text, mapped to token spans: the unit of thought-anchor analyses.

Thought Anchors (Bogdan et al. 2025) cut reasoning into sentences: after ``.``, ``?`` or ``!`` followed by
whitespace, or at a blank line; fragments shorter than ``MIN_CHARS`` merge into the next one. Spans map to
tokens through the trace's character offsets. This module reads traces only.
"""

from __future__ import annotations

import itertools
import re
import warnings
from dataclasses import dataclass

import torch

from ..errors import UsageError

MIN_CHARS = 10  # Thought Anchors: fragments shorter than this merge into the next one
COARSE_WARN, COARSE_FAIL = 2.0, 8.0  # block size / median sentence tokens: warn, refuse

_THINK = re.compile(r"</?think>")
# A cut after ., ? or ! followed by whitespace, or at a blank line (a newline, spaces, a newline).
_CUT = re.compile(r"(?<=[.?!])(?=\s)|\n[ \t]*\n")
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


@dataclass(frozen=True)
class Sentence:
    """One sentence: its text, character span ``[char_start, char_end)`` in the traced text and token
    span ``[token_start, token_end)`` (exclusive end) in the trace's tokens."""

    index: int
    text: str
    char_start: int
    char_end: int
    token_start: int = -1
    token_end: int = -1

    @property
    def char_span(self) -> tuple[int, int]:
        return self.char_start, self.char_end

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start


# --------------------------------------------------------------------------- 1. sentences

def split_sentences(text: str, regions: list[tuple[int, int]] | None = None, *,
                    min_chars: int = MIN_CHARS) -> list[Sentence]:
    """Split ``text`` into sentences the way Thought Anchors splits a chain of thought.

    Rules: a sentence ends after ``.``, ``?`` or ``!`` followed by whitespace, and at a blank line;
    ``<think>`` / ``</think>`` tags are removed (they also end a sentence); surrounding whitespace is
    stripped; a fragment shorter than ``min_chars`` characters merges into the next one (the last one,
    into the previous). ``regions`` (character spans, default the whole text) restricts the split to
    parts of the text, e.g. the message contents of a chat transcript; sentences never cross regions.
    Character spans index ``text``; a merged sentence spans from its first fragment's start to its
    last's end and its ``text`` is the fragments joined by one space. Token spans are not set here.
    """
    regions = [(0, len(text))] if regions is None else regions
    out: list[Sentence] = []
    for start, end in regions:
        pieces: list[tuple[int, int]] = []
        cuts = [start]
        for m in _THINK.finditer(text, start, end):
            cuts += [m.start(), m.end()]
        cuts.append(end)
        for a, b in zip(cuts[::2], cuts[1::2]):  # the stretches between tags
            edges = [a] + [m.end() for m in _CUT.finditer(text, a, b)] + [b]
            for u, v in itertools.pairwise(edges):
                u += len(text[u:v]) - len(text[u:v].lstrip())
                v -= len(text[u:v]) - len(text[u:v].rstrip())
                if v > u:
                    pieces.append((u, v))
        for u, v, joined in _merge_short(text, pieces, min_chars):
            out.append(Sentence(len(out), joined, u, v))
    return out


def split_paragraphs(text: str, regions: list[tuple[int, int]] | None = None) -> list[Sentence]:
    """Paragraphs of ``text``: the stretches between blank lines (a newline, spaces, a newline), stripped,
    empty ones dropped, within ``regions`` (default the whole text). The same records as sentences, so
    :func:`map_to_tokens` gives their token spans."""
    regions = [(0, len(text))] if regions is None else regions
    out: list[Sentence] = []
    for start, end in regions:
        edges = [start] + [x for m in _BLANK_LINE.finditer(text, start, end) for x in (m.start(), m.end())]
        edges.append(end)
        for u, v in zip(edges[::2], edges[1::2]):
            u += len(text[u:v]) - len(text[u:v].lstrip())
            v -= len(text[u:v]) - len(text[u:v].rstrip())
            if v > u:
                out.append(Sentence(len(out), text[u:v], u, v))
    return out


def _merge_short(text: str, pieces: list[tuple[int, int]], min_chars: int):
    """Thought Anchors' merge: a short fragment joins the next (the last joins the previous)."""
    spans = [[u, v, text[u:v]] for u, v in pieces]
    i = 0
    while i < len(spans) and len(spans) > 1:
        if len(spans[i][2]) >= min_chars:
            i += 1
        elif i == len(spans) - 1:
            prev = spans[i - 1]
            spans[i - 1] = [prev[0], spans[i][1], prev[2] + " " + spans[i][2]]
            spans.pop(i)
        else:
            spans[i + 1] = [spans[i][0], spans[i + 1][1], spans[i][2] + " " + spans[i + 1][2]]
            spans.pop(i)
    return [tuple(s) for s in spans]


def map_to_tokens(sentences: list[Sentence], token_offsets: torch.Tensor) -> list[Sentence]:
    """Set token spans from the tokens' character spans ``token_offsets [T, 2]``.

    A sentence owns the tokens that overlap its character span (a token " The" whose span starts at
    the space before the sentence belongs to it); spans are made disjoint in sentence order, and
    sentences left without tokens (e.g. past a ``max_tokens`` cut) are dropped and re-indexed.
    """
    offsets = torch.as_tensor(token_offsets).long().view(-1, 2)
    starts = torch.cummax(offsets[:, 0], 0).values.contiguous()  # monotone for searchsorted
    ends = torch.cummax(offsets[:, 1], 0).values.contiguous()
    cs = torch.tensor([s.char_start for s in sentences], dtype=torch.long)
    ce = torch.tensor([s.char_end for s in sentences], dtype=torch.long)
    first = torch.searchsorted(ends, cs, right=True).tolist()  # first token ending after char_start
    stop = torch.searchsorted(starts, ce, right=False).tolist()  # first token starting at/after end
    out, prev_end = [], 0
    for s, a, b in zip(sentences, first, stop):
        a = max(a, prev_end)
        if b > a:
            out.append(Sentence(len(out), s.text, s.char_start, s.char_end, a, b))
            prev_end = b
    return out


def trace_sentences(trace, regions: list[tuple[int, int]] | None = None, *,
                    min_chars: int = MIN_CHARS, check_resolution: bool = True) -> list[Sentence]:
    """Sentences of ``trace.text`` with token spans; ``regions`` default to the manifest's
    ``anchors_regions`` (set by the gsm builder), else the whole text.

    Raises UsageError for a trace without text offsets, fewer than two sentences, or blocks far larger
    than the sentences (warns when merely coarse).
    """
    if trace.text is None or trace.token_offsets is None:
        raise UsageError("the trace has no text and character offsets; trace a text with "
                         "`sparsetrace trace --text-file F` (or trace_text), which records them.")
    if regions is None:
        regions = trace.manifest.get("anchors_regions") or trace.meta.get("anchors_regions")
        regions = [tuple(r) for r in regions] if regions else None
    sentences = map_to_tokens(split_sentences(trace.text, regions, min_chars=min_chars),
                              trace.token_offsets[: trace.num_tokens])
    if len(sentences) < 2:
        raise UsageError(f"the traced text has {len(sentences)} sentence(s); thought anchors need at "
                         "least two (sentences end at . ? ! followed by whitespace, or a blank line).")
    if check_resolution:
        check_block_resolution(sentences, max(trace.block_q, trace.block_k))
    return sentences


def check_block_resolution(sentences: list[Sentence], block: int) -> float:
    """Blocks vs sentences: returns block / median sentence length in tokens; warns above 2,
    raises UsageError above 8 (a block then spans many sentences and the matrix is mostly smear)."""
    lengths = torch.tensor([s.num_tokens for s in sentences], dtype=torch.float)
    ratio = block / max(lengths.median().item(), 1.0)
    if ratio > COARSE_FAIL:
        raise UsageError(f"block size {block} is {ratio:.0f}x the median sentence ({lengths.median():.0f}"
                         f" tokens): far too coarse for sentence attention; re-trace with "
                         f"--block-size {max(4, int(lengths.median().item()))} or smaller.")
    if ratio > COARSE_WARN:
        warnings.warn(f"block size {block} is {ratio:.1f}x the median sentence "
                      f"({lengths.median():.0f} tokens): sentence resolution is coarse; a smaller "
                      "--block-size gives sharper sentence attention.", stacklevel=3)
    return ratio


def sentence_ids(sentences: list[Sentence], T: int) -> torch.Tensor:
    """int64 ``[T]``: the sentence of each token, -1 outside every sentence."""
    sid = torch.full((T,), -1, dtype=torch.long)
    for s in sentences:
        sid[s.token_start:s.token_end] = s.index
    return sid


def sentence_lengths(sentences: list[Sentence]) -> torch.Tensor:
    return torch.tensor([s.num_tokens for s in sentences], dtype=torch.float64)
