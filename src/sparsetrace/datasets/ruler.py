"""Needle in a haystack: RULER's NIAH cases, fitted to a model's tokenizer, and their scoring.

After RULER ("RULER: What's the Real Context Size of Your Long-Context Language Models?", Hsieh et
al. 2024, arXiv 2404.06654; NVIDIA/RULER ``scripts/data/synthetic/{constants,niah}.py`` and
``synthetic.yaml``). The texts are RULER's:

    needle    "One of the special magic {type_needle_v} for {key} is: {value}."
    template  "Some special magic {type_needle_v} are hidden within the following text. Make sure to
              memorize it. I will quiz you about the {type_needle_v} afterwards.\\n{context}\\nWhat
              are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
    prefix    " The special magic {type_needle_v} for {query} mentioned in the provided text are"

and the model reads ``template + prefix`` (RULER's base-model layout; no chat template). As in RULER,
when one value is asked for (``num_needle_q * num_needle_v == 1``) the template and prefix are made
singular ("Some" -> "A", "are all" / "are" -> "is", "numbers" -> "number") while the needle keeps the
plural; several queried keys read "k1, k2, and k3". Values are 7-digit numbers or uuid4 strings; keys
are "adjective-noun" words. Variants (RULER's names and settings):

    niah_single_1    noise haystack (the repeated "The grass is green. ..." paragraph), number values
    niah_single_2    essay haystack, number values
    niah_single_3    essay haystack, uuid values
    niah_multikey_1  essay haystack, 4 keys: the queried needle plus 3 distractor needles
    niah_multikey_2  haystack made of needles (word keys, number values)
    niah_multikey_3  haystack made of needles with uuid keys and uuid values
    niah_multivalue  essay haystack, 4 values for the queried key
    niah_multiquery  essay haystack, 4 keys, all 4 queried

Differences from RULER, on purpose:
  - Depth is requested, not random: the first answer-bearing needle goes to the sentence boundary
    nearest ``depth`` % of the haystack (0 = before the first sentence, 100 = after the last);
    any other needle goes to a seeded random depth from RULER's grid (40 depths over 0..100).
  - Word keys come from a small built-in list (60 adjectives x 60 nouns), not from ``wonderwords``
    (not installed here); RULER's keys are the same shape ("adjective-noun").
  - Length: the number of haystack units is binary-searched so that the whole prompt (special
    tokens included) is at most ``length`` tokens of the model's own tokenizer, with no room kept for
    the answer (RULER subtracts ``tokens_to_generate``). Units are words for essays and text files
    (RULER's unit), short sentences for the noise haystack, and lines for the needle haystack, so the
    prompt lands within one unit of the target (a couple of tokens; one needle line, 20-60 tokens,
    for niah_multikey_2/3).
  - Seeds: every case draws from ``random.Random("{seed}/{variant}/{length}/{depth}/{sample}")``, so a
    case does not depend on which other cases are generated, and the same seed gives identical cases.

Scoring is RULER's ``string_match_all``: the fraction of expected values that occur in the
prediction, case-insensitively. ``sparsetrace.runs.niah`` decodes the cases with a model, dense and
sparse, and ``sparsetrace.analysis.routes`` reads the needle's route from the sparse run's trace.
"""

from __future__ import annotations

import math
import random
import re
import uuid
from dataclasses import asdict, dataclass, field

from ..errors import UsageError

TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize "
    "it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special "
    "magic {type_needle_v} for {query} mentioned in the provided text?"
)
ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# RULER's needle depths: np.round(np.linspace(0, 100, num=40)).
RULER_DEPTHS = tuple(math.floor(100 * i / 39 + 0.5) for i in range(40))


@dataclass(frozen=True)
class Variant:
    """One RULER NIAH setting (``scripts/synthetic.yaml``)."""

    haystack: str  # "noise" | "essay" | "needle"
    type_needle_k: str  # "words" | "uuids"
    type_needle_v: str  # "numbers" | "uuids"
    num_needle_k: int = 1
    num_needle_v: int = 1
    num_needle_q: int = 1


VARIANTS: dict[str, Variant] = {
    "niah_single_1": Variant("noise", "words", "numbers"),
    "niah_single_2": Variant("essay", "words", "numbers"),
    "niah_single_3": Variant("essay", "words", "uuids"),
    "niah_multikey_1": Variant("essay", "words", "numbers", num_needle_k=4),
    "niah_multikey_2": Variant("needle", "words", "numbers"),
    "niah_multikey_3": Variant("needle", "uuids", "uuids"),
    "niah_multivalue": Variant("essay", "words", "numbers", num_needle_v=4),
    "niah_multiquery": Variant("essay", "words", "numbers", num_needle_k=4, num_needle_q=4),
}

# A small stand-in for wonderwords' adjective and noun lists (keys read "adjective-noun").
ADJECTIVES = """
    able acid angry bitter black bold brave brief bright broad calm cheap clean clever cold cool
    crisp curly damp dark deep dry dull early eager fair fancy fast fierce flat fresh gentle giant
    glad grand green happy heavy hollow honest huge jolly keen kind large lazy light little loud
    lucky mellow merry narrow neat noisy odd plain polite proud quick quiet rapid
""".split()
NOUNS = """
    apple badge basket beach bell berry bird blanket boat bottle bread bridge brush button cabin
    candle canvas castle cat chair cloud coat comet copper cotton crown desk dinner dragon drum
    eagle engine feather fence forest garden glass guitar hammer harbor helmet island jacket kettle
    ladder lantern lemon meadow mirror needle orange painter pencil pepper piano pillow river
""".split()


@dataclass
class Needle:
    """One inserted needle. Spans are ``[start, end)``: characters of ``NiahCase.input`` and tokens
    of its encoding (special tokens included). ``relevant``: it holds an expected answer."""

    text: str
    key: str
    value: str
    relevant: bool
    char_span: tuple[int, int]
    token_span: tuple[int, int] = (0, 0)
    depth: float = 0.0  # where it landed: haystack units before it / all units, in percent


@dataclass
class NiahCase:
    """A NIAH prompt with its answers and where its needles sit (one line of ``cases.jsonl``).

    ``input`` is the whole text the model reads (template, haystack, question, answer prefix);
    ``num_tokens`` its length with the tokenizer's special tokens; ``needle_token_spans`` the token
    spans of the answer-bearing needles (``needles`` lists every needle, distractors included).
    """

    id: str
    variant: str
    length: int
    depth: float
    sample: int
    seed: int
    input: str
    answers: list[str]
    queries: list[str]
    num_tokens: int
    needle_token_spans: list[tuple[int, int]]
    needles: list[Needle] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> NiahCase:
        data = dict(data)
        data["needles"] = [
            Needle(**{**n, "char_span": tuple(n["char_span"]), "token_span": tuple(n["token_span"])})
            for n in data.get("needles", [])
        ]
        data["needle_token_spans"] = [tuple(s) for s in data["needle_token_spans"]]
        return cls(**data)


# --------------------------------------------------------------------------- parsing and checks

def check_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise UsageError(f"unknown NIAH variant {name!r}; valid variants: {', '.join(VARIANTS)}.")
    return VARIANTS[name]


def parse_length(text: str) -> int:
    """``"4k"`` -> 4096, ``"600"`` -> 600 (k = 1024 tokens, as RULER's 4k = 4096)."""
    t = str(text).strip().lower()
    try:
        value = int(float(t[:-1]) * 1024) if t.endswith("k") else int(t)
    except ValueError:
        raise UsageError(f"length {text!r} is not a token count like 600, 1k or 4096.") from None
    if value <= 0:
        raise UsageError(f"length {text!r} must be a positive number of tokens.")
    return value


# --------------------------------------------------------------------------- random draws

def _number(rng: random.Random) -> str:
    return str(rng.randint(10**6, 10**7 - 1))  # 7 digits, as RULER


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _draw(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return _number(rng)
    if kind == "uuids":
        return _uuid(rng)
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"  # "words"


def _keys(kind: str, n: int, rng: random.Random, avoid: set[str] = frozenset()) -> list[str]:
    keys: list[str] = []
    while len(keys) < n:
        key = _draw(kind, rng)
        if key not in keys and key not in avoid:
            keys.append(key)
    return keys


# --------------------------------------------------------------------------- haystacks

class _Haystack:
    """A growable haystack: ``body(n)`` gives its first n units as text segments between which
    needles may go, joined by ``sep``."""

    def __init__(self, kind: str, variant: Variant, text: str | None, rng: random.Random,
                 avoid_keys: set[str]):
        self.kind, self.variant, self.rng, self.avoid = kind, variant, rng, avoid_keys
        if kind == "essay":
            # RULER: re.sub(r"\s+", " ", essay).split(" "); units are words.
            self.words = re.sub(r"\s+", " ", text).strip().split(" ")
            self.sep = " "
        elif kind == "noise":
            self.sentences = re.split(r"(?<=\.) ", NOISE)  # 5 short sentences per line
            self.sep = "\n"
        else:  # "needle": distractor needles with other keys, one per line
            self.lines: list[str] = []
            self.sep = "\n"

    def _line(self) -> str:
        v = self.variant
        key = _keys(v.type_needle_k, 1, self.rng, self.avoid)[0]
        return NEEDLE.format(type_needle_v=v.type_needle_v, key=key, value=_draw(v.type_needle_v,
                                                                                  self.rng))

    def body(self, n: int) -> list[str]:
        """Segments (sentences, lines) of the first ``n`` units; needles go between segments."""
        if n <= 0:
            return []
        if self.kind == "essay":
            words = [self.words[i % len(self.words)] for i in range(n)]  # cycles like RULER
            text = " ".join(words)
            return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]
        if self.kind == "noise":
            per = len(self.sentences)
            return [" ".join(self.sentences[: min(per, n - i)]) for i in range(0, n, per)]
        while len(self.lines) < n:  # lazily drawn, so every n sees the same first lines
            self.lines.append(self._line())
        return self.lines[:n]


# --------------------------------------------------------------------------- building a case

def _template(variant: Variant) -> tuple[str, str, str]:
    """(template, answer prefix, type word) with RULER's singularisation for a single value."""
    template, prefix, word = TEMPLATE, ANSWER_PREFIX, variant.type_needle_v
    if variant.num_needle_q * variant.num_needle_v == 1:
        for a, b in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template, prefix = template.replace(a, b), prefix.replace(a, b)
        word = word[:-1]
    return template, prefix, word


def _assemble(head: str, tail: str, segments: list[str], sep: str,
              placed: list[tuple[int, int, str]]) -> tuple[str, list[tuple[int, int]]]:
    """``head + context + tail``, the context being ``segments`` with needle ``text`` inserted
    before segment ``slot`` (``placed`` items are ``(slot, order, text)``). Returns the text and the
    character span of every placed needle, in the order of ``placed``."""
    by_slot: dict[int, list[tuple[int, int]]] = {}
    for i, (slot, order, _) in enumerate(placed):
        by_slot.setdefault(slot, []).append((order, i))
    parts: list[tuple[str, int | None]] = []
    for slot in range(len(segments) + 1):
        for _, i in sorted(by_slot.get(slot, [])):
            parts.append((placed[i][2], i))
        if slot < len(segments):
            parts.append((segments[slot], None))
    out, spans, pos = [head], [(0, 0)] * len(placed), len(head)
    for j, (text, i) in enumerate(parts):
        if j:
            out.append(sep)
            pos += len(sep)
        if i is not None:
            spans[i] = (pos, pos + len(text))
        out.append(text)
        pos += len(text)
    out.append(tail)
    return "".join(out), spans


def _encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def encode(tokenizer, case: NiahCase):
    """Token ids ``[T]`` (int64 tensor, special tokens included) of ``case.input``."""
    import torch

    return torch.tensor(_encode(tokenizer, case.input)[0], dtype=torch.long)


def token_span(offsets: list[tuple[int, int]], char_span: tuple[int, int]) -> tuple[int, int]:
    """``[start, end)`` of the tokens whose characters overlap ``char_span`` (special tokens, which
    have empty offsets, never count)."""
    a, b = char_span
    hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < b and e > a]
    assert hits, f"no token overlaps characters {char_span}"
    return hits[0], hits[-1] + 1


def make_case(variant: str, tokenizer, length: int, depth: float, *, seed: int = 0,
              sample: int = 0, haystack: str | None = None) -> NiahCase:
    """One NIAH case of ``variant`` whose prompt is at most ``length`` tokens (as close as the
    haystack's unit allows), the first answer-bearing needle at ``depth`` percent.

    ``haystack``: the essay text (default: the Paul Graham essays of :func:`sparsetrace.datasets.essays.
    haystack_text`); it replaces the essays of the essay variants and is ignored by the others.
    Raises UsageError for an unknown variant, a depth outside 0..100, or a length too short to
    hold the template, the needles and the question.
    """
    v = check_variant(variant)
    if not 0 <= depth <= 100:
        raise UsageError(f"depth {depth} is outside 0..100 (percent of the haystack).")
    rng = random.Random(f"{seed}/{variant}/{length}/{depth:g}/{sample}")

    # Needles (RULER's generate_input_output): num_needle_k keys, num_needle_v values each.
    keys = _keys(v.type_needle_k, v.num_needle_k, rng)
    values = [[_draw(v.type_needle_v, rng) for _ in range(v.num_needle_v)] for _ in keys]
    queried = sorted(rng.sample(range(v.num_needle_k), v.num_needle_q))
    needles = [
        (NEEDLE.format(type_needle_v=v.type_needle_v, key=k, value=val), k, val, ki in queried)
        for ki, k in enumerate(keys) for val in values[ki]
    ]
    rng.shuffle(needles)
    first = next(i for i, n in enumerate(needles) if n[3])  # goes to the requested depth
    other_depths = [rng.choice(RULER_DEPTHS) for _ in needles]

    queries = [keys[i] for i in queried]
    answers = [a for i in queried for a in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, prefix, word = _template(v)
    full = template.format(type_needle_v=word, context="\0", query=query) + prefix.format(
        type_needle_v=word, query=query)
    head, tail = full.split("\0")
    if v.haystack == "essay" and haystack is None:
        from .essays import haystack_text

        haystack = haystack_text(max_chars=max(20_000, 8 * length))
    if v.haystack == "essay" and not (haystack or "").strip():
        raise UsageError("the haystack text is empty; give a file with some text in it.")
    stack = _Haystack(v.haystack, v, haystack, random.Random(rng.random()), set(keys))

    def build(n: int):
        segments = stack.body(n)
        slots = [round(d / 100 * len(segments)) for d in other_depths]
        slots[first] = round(depth / 100 * len(segments))
        placed = [(slot, i, needles[i][0]) for i, slot in enumerate(slots)]
        text, spans = _assemble(head, tail, segments, stack.sep, placed)
        return text, spans, slots, len(segments)

    def count(n: int) -> int:
        return len(_encode(tokenizer, build(n)[0])[0])

    base = count(0)
    if base > length:
        raise UsageError(
            f"length {length} is shorter than the needles and question of {variant}: the minimum "
            f"is {base} tokens for this tokenizer; ask for a longer length."
        )
    # Exponential then binary search: the largest unit count whose prompt fits in `length`.
    lo, hi = 0, 16
    while count(hi) <= length:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) <= length else (lo, mid)

    text, spans, slots, n_segments = build(lo)
    ids, offsets = _encode(tokenizer, text)
    records = []
    for (ntext, key, value, relevant), span, slot in zip(needles, spans, slots):
        assert text[span[0]:span[1]] == ntext
        records.append(Needle(ntext, key, value, relevant, span, token_span(offsets, span),
                              100.0 * slot / max(n_segments, 1)))
    return NiahCase(
        id=f"{variant}-{length}-d{depth:g}-s{sample}", variant=variant, length=length, depth=depth,
        sample=sample, seed=seed, input=text, answers=answers, queries=queries,
        num_tokens=len(ids), needle_token_spans=[n.token_span for n in records if n.relevant],
        needles=records,
    )


def make_cases(variants, tokenizer, lengths, depths, *, samples: int = 1, seed: int = 0,
               haystack: str | None = None) -> list[NiahCase]:
    """Every (variant, length, depth, sample) case, in that nesting order."""
    if isinstance(variants, str):
        variants = [variants]
    for name in variants:
        check_variant(name)
    if haystack is None and any(VARIANTS[n].haystack == "essay" for n in variants):
        from .essays import haystack_text

        haystack = haystack_text(max_chars=max(20_000, 8 * max(lengths)))
    return [
        make_case(name, tokenizer, length, depth, seed=seed, sample=s, haystack=haystack)
        for name in variants for length in lengths for depth in depths for s in range(samples)
    ]


def needle_depth_tokens(case: NiahCase) -> float:
    """Where the first answer-bearing needle starts, in percent of the prompt's tokens."""
    return 100.0 * case.needle_token_spans[0][0] / case.num_tokens


# --------------------------------------------------------------------------- scoring

def postprocess(prediction: str) -> str:
    """RULER's ``postprocess_pred``: control characters become newlines, then strip."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, answers: list[str]) -> float:
    """RULER's ``string_match_all`` for one case: the fraction of ``answers`` found in
    ``prediction``, case-insensitively (RULER reports the mean over cases x 100)."""
    if not answers:
        raise UsageError("a NIAH case needs at least one expected answer.")
    pred = postprocess(prediction).lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def max_new_tokens(case: NiahCase) -> int:
    """Enough greedy tokens for the expected values: 12 per number, 32 per uuid, plus a few."""
    per = 32 if VARIANTS[case.variant].type_needle_v == "uuids" else 12
    return 4 + per * len(case.answers)
