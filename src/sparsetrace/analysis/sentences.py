"""Sentences of a traced text, mapped to token spans: the unit of thought-anchor analyses.

Thought Anchors (Bogdan et al. 2025) cut reasoning into sentences: after ``.``, ``?`` or ``!`` followed by
whitespace, or at a blank line; fragments shorter than ``MIN_CHARS`` merge into the next one. Spans map to
tokens through the trace's character offsets. This module reads traces only.
"""

from __future__ import annotations

import itertools
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import UsageError

MIN_CHARS = 10  # Thought Anchors: fragments shorter than this merge into the next one
COARSE_WARN, COARSE_FAIL = 2.0, 8.0  # block size / median sentence tokens: warn, refuse

_THINK = re.compile(r"</?think>")
# A cut after ., ? or ! followed by whitespace, or at a blank line (a newline, spaces, a newline).
_CUT = re.compile(r"(?<=[.?!])(?=\s)|\n[ \t]*\n")
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
# _CUT's first alternative, matched on the punctuation mark itself: the same ends (a match never spans a
# blank line's characters, nor a blank line a mark), found 5x faster than by a look-behind at every
# position (0.1 s against 0.56 s for a 5.6M-character text).
_MARK_CUT = re.compile(r"[.?!](?=\s)")


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
    pieces, groups = _sentence_pieces(text, regions, min_chars)
    return [Sentence(i, _joined(text, pieces, a, b), pieces[a][0], pieces[b - 1][1])
            for i, (a, b) in enumerate(groups)]


def _sentence_pieces(text: str, regions, min_chars: int):
    """``(pieces, groups)``: the stripped fragments ``(u, v)`` between cuts, in text order, and each
    sentence as the fragments ``[a, b)`` it joins (Thought Anchors' merge of short fragments, in one pass)."""
    regions = [(0, len(text))] if regions is None else regions
    pieces: list[tuple[int, int]] = []
    groups: list[tuple[int, int]] = []
    for start, end in regions:
        first_piece, first_group = len(pieces), len(groups)
        cuts = [start]
        for m in _THINK.finditer(text, start, end):
            cuts += [m.start(), m.end()]
        cuts.append(end)
        for a, b in zip(cuts[::2], cuts[1::2]):  # the stretches between tags
            edges = [a, *_cut_ends(text, a, b), b]
            for u, v in itertools.pairwise(edges):
                piece = text[u:v]
                kept = piece.strip()
                if kept:
                    u += len(piece) - len(piece.lstrip())
                    pieces.append((u, u + len(kept)))
        # a fragment shorter than min_chars joins the next (the region's last, the previous sentence):
        # a sentence's length is its fragments' plus one space between each two
        a, length = None, 0
        for i in range(first_piece, len(pieces)):
            u, v = pieces[i]
            a, length = (i, v - u) if a is None else (a, length + 1 + v - u)
            if length >= min_chars:
                groups.append((a, i + 1))
                a = None
        if a is not None:
            if len(groups) > first_group:
                groups[-1] = (groups[-1][0], len(pieces))
            else:
                groups.append((a, len(pieces)))
    return pieces, groups


def _cut_ends(text: str, a: int, b: int) -> list[int]:
    """The ends of ``_CUT``'s matches in ``text[a:b]``, ascending (an end at ``a`` itself, which only
    makes an empty piece, left out)."""
    ends = [m.end() for m in _MARK_CUT.finditer(text, a, b)]
    blank = [m.end() for m in _BLANK_LINE.finditer(text, a, b)]
    return sorted(ends + blank) if blank else ends


def _joined(text: str, pieces: list[tuple[int, int]], a: int, b: int) -> str:
    return text[pieces[a][0]:pieces[a][1]] if b == a + 1 else " ".join(text[u:v] for u, v in pieces[a:b])


def split_paragraphs(text: str, regions: list[tuple[int, int]] | None = None) -> list[Sentence]:
    """Paragraphs of ``text``: the stretches between blank lines (a newline, spaces, a newline), stripped,
    empty ones dropped, within ``regions`` (default the whole text). The same records as sentences, so
    :func:`map_to_tokens` gives their token spans."""
    return [Sentence(i, text[u:v], u, v) for i, (u, v) in enumerate(_paragraph_spans(text, regions))]


def _paragraph_spans(text: str, regions) -> list[tuple[int, int]]:
    regions = [(0, len(text))] if regions is None else regions
    out: list[tuple[int, int]] = []
    for start, end in regions:
        edges = [start] + [x for m in _BLANK_LINE.finditer(text, start, end) for x in (m.start(), m.end())]
        edges.append(end)
        for u, v in zip(edges[::2], edges[1::2]):
            u += len(text[u:v]) - len(text[u:v].lstrip())
            v -= len(text[u:v]) - len(text[u:v].rstrip())
            if v > u:
                out.append((u, v))
    return out


def map_to_tokens(sentences: list[Sentence], token_offsets: torch.Tensor) -> list[Sentence]:
    """Set token spans from the tokens' character spans ``token_offsets [T, 2]``.

    A sentence owns the tokens that overlap its character span (a token " The" whose span starts at
    the space before the sentence belongs to it); spans are made disjoint in sentence order, and
    sentences left without tokens (e.g. past a ``max_tokens`` cut) are dropped and re-indexed.
    """
    cs = torch.tensor([s.char_start for s in sentences], dtype=torch.long)
    ce = torch.tensor([s.char_end for s in sentences], dtype=torch.long)
    first, stop = (x.tolist() for x in _token_bounds(cs, ce, token_offsets))
    out, prev_end = [], 0
    for s, a, b in zip(sentences, first, stop):
        a = max(a, prev_end)
        if b > a:
            out.append(Sentence(len(out), s.text, s.char_start, s.char_end, a, b))
            prev_end = b
    return out


def _token_bounds(cs: torch.Tensor, ce: torch.Tensor, token_offsets) -> tuple[torch.Tensor, torch.Tensor]:
    """For character spans ``[cs, ce)``: the first token ending after ``cs`` and the first token starting at
    or after ``ce`` (int64 each)."""
    offsets = torch.as_tensor(token_offsets).long().view(-1, 2)
    starts = torch.cummax(offsets[:, 0], 0).values.contiguous()  # monotone for searchsorted
    ends = torch.cummax(offsets[:, 1], 0).values.contiguous()
    return torch.searchsorted(ends, cs, right=True), torch.searchsorted(starts, ce, right=False)


class Passages(Sequence):
    """The sentences or paragraphs of a whole text with their token spans, as arrays: ``token_start``,
    ``token_end`` int64 ``[n]``; the :class:`Sentence` records are made when asked for (a 1M-token text has
    ~10^5 sentences: 0.5 s of records in Python, twice). The same records in the same order as
    ``map_to_tokens(split_sentences(text), token_offsets)`` (or ``split_paragraphs``): see
    :func:`text_passages`."""

    def __init__(self, text: str, pieces: list[tuple[int, int]], groups: torch.Tensor,
                 token_start: torch.Tensor, token_end: torch.Tensor):
        self.text, self.pieces, self.groups = text, pieces, groups  # groups [n, 2]: fragments [a, b)
        self.token_start, self.token_end = token_start, token_end

    def __len__(self) -> int:
        return self.groups.shape[0]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        a, b = self.groups[i].tolist()
        return Sentence(i, _joined(self.text, self.pieces, a, b), self.pieces[a][0], self.pieces[b - 1][1],
                        int(self.token_start[i]), int(self.token_end[i]))


def text_passages(text: str, token_offsets: torch.Tensor, kind: str = "sentence", *,
                  min_chars: int = MIN_CHARS) -> Passages:
    """The sentences (``kind="sentence"``) or paragraphs of all of ``text`` mapped to tokens, as
    ``map_to_tokens(split_sentences(text, min_chars=min_chars), token_offsets)`` (or ``split_paragraphs``)
    gives them, without a Python record per passage. Over the whole text the passages are in text order,
    so map_to_tokens' walk (a passage starts after the previous one kept ends) is a running maximum: a
    passage dropped there ends at or before its own first token, which no later passage's start precedes."""
    if kind == "sentence":
        pieces, groups = _sentence_pieces(text, None, min_chars)
    else:
        pieces = _paragraph_spans(text, None)
        groups = [(i, i + 1) for i in range(len(pieces))]
    groups = torch.tensor(groups, dtype=torch.long).view(-1, 2)
    spans = torch.tensor(pieces, dtype=torch.long).view(-1, 2)
    cs, ce = spans[groups[:, 0], 0], spans[groups[:, 1] - 1, 1]               # [n] character spans
    first, stop = _token_bounds(cs, ce, token_offsets)
    before = torch.cummax(torch.cat([torch.zeros(1, dtype=torch.long), stop]), 0).values[:-1]
    start = torch.maximum(first, before)                                     # after the previous ones' tokens
    keep = stop > start
    return Passages(text, pieces, groups[keep], start[keep], stop[keep])


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
