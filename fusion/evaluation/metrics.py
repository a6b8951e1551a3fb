"""Evaluation metrics, implemented here from their papers: answer accuracy, BLEU-4 and CIDEr-D.

Tokenisation for BLEU and CIDEr-D (`caption_tokens`): NFC, lowercase, then the maximal runs of letters,
digits and combining marks of any script ("Un café" → ["un", "café"], "हिन्दी भाषा" → ["हिन्दी", "भाषा"]: a
vowel sign or virama is part of its word); punctuation and whitespace only separate tokens
("top-left." → ["top", "left"]). Text written without spaces between words (Chinese, Japanese, Thai) is one
token per run: segment it into words first for meaningful BLEU and CIDEr.

References may be given per candidate as one string or as a list of strings.
"""
from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter, defaultdict
from typing import Sequence

ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {
    "zero": "0", "none": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12",
}


def _word_marks() -> str:
    """A regex class body of the characters that `re`'s \\w leaves out but that belong to a word: the
    combining marks (Unicode categories Mn, Mc, Me: Devanagari and Thai vowel signs, viramas, an accent
    written as its own character) and the zero-width non-joiner and joiner written inside Persian and Indic
    words. Marks lie in planes 0, 1 and 14 only, so the other planes are not scanned (0.02 s, not 0.2 s)."""
    codes = sorted([c for block in (range(0x20000), range(0xE0000, 0xE1000)) for c in block
                    if unicodedata.category(chr(c)).startswith("M")] + [0x200C, 0x200D])
    runs: list[list[int]] = []  # [first, last] of each run of consecutive code points
    for code in codes:
        if runs and code == runs[-1][1] + 1:
            runs[-1][1] = code
        else:
            runs.append([code, code])
    return "".join(f"{chr(first)}-{chr(last)}" for first, last in runs)


_MARKS = _word_marks()
# punctuation becomes a space, except a decimal point ("1.5", ".5" stay numbers: a "." before a digit stays,
# unless a letter comes before it: "No.1" is "no 1")
_PUNCTUATION = re.compile(rf"(?!(?<![^\W\d_])\.\d)[^\w\s{_MARKS}]|_")
_APOSTROPHE = re.compile(r"['\u2019]")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3})")
_WORD = re.compile(rf"(?:[^\W_]|[{_MARKS}])+")


def normalize_answer(answer: str) -> str:
    """VQA-style normalisation: NFKC (full-width "２" = "2"; "é" = "e" + a combining accent), lowercase,
    apostrophes dropped ("don't" = "dont"), thousands separators dropped ("1,000" = "1000"), other punctuation
    → space (a decimal point stays: "1.5", ".5"; combining marks are part of their word, "हरा" ≠ "हर"), drop the
    articles a/an/the unless the answer is nothing else (a multiple-choice "A", "(A)." → "a"), number words →
    digits ("two" → "2", up to "twelve"; the official VQA script stops at "ten"), collapse spaces.
    "The Red-circle." → "red circle"; "Two" → "2".
    """
    # NFKC, not only NFC: an answer is matched, not displayed, and the compatibility forms (full-width
    # letters and digits typed with CJK input methods, ligatures, "½" = "1/2") are the same answer written
    # differently. Caption tokens (`caption_tokens`) take only NFC: BLEU and CIDEr-D compare text as written.
    text = unicodedata.normalize("NFKC", str(answer)).lower()
    text = _THOUSANDS.sub("", _APOSTROPHE.sub("", text))
    words = _PUNCTUATION.sub(" ", text).split()
    words = [w for w in words if w not in ARTICLES] or words  # only articles: the answer itself (option "A")
    return " ".join(NUMBER_WORDS.get(w, w) for w in words)


def _as_reference_list(reference) -> list[str]:
    return [reference] if isinstance(reference, str) else list(reference)


def _check_lengths(name: str, candidates, references) -> None:
    if len(candidates) != len(references):
        raise ValueError(f"{name}: {len(candidates)} predictions but {len(references)} references; "
                         "give one reference (or list of references) per prediction")
    if not candidates:
        raise ValueError(f"{name}: no predictions to score")


def answer_is_correct(prediction: str, reference) -> bool:
    """Normalised exact match against the reference, or against any of a list of references. An answer that
    normalises to nothing (empty, or only punctuation and spaces) is never correct."""
    normalized = normalize_answer(prediction)
    return bool(normalized) and any(normalized == normalize_answer(r) for r in _as_reference_list(reference))


def vqa_accuracy(predictions: Sequence[str], references: Sequence) -> float:
    """The fraction of predictions that match their reference after `normalize_answer` (0.0 to 1.0); with a
    list of references, matching any one counts (for VQAv2's ten human answers use `vqa_consensus_accuracy`)."""
    _check_lengths("vqa_accuracy", predictions, references)
    return sum(answer_is_correct(p, r) for p, r in zip(predictions, references)) / len(predictions)


def vqa_consensus_score(prediction: str, answers: Sequence[str]) -> float:
    """The VQA challenge's score of one prediction against several human answers (VQAv2 has ten):
    min(1, matches / 3) among the other answers, averaged over leaving out each answer in turn. Ten
    answers of which one matches: 0.3; three or more matching: 1.0."""
    answers = _as_reference_list(answers)
    if len(answers) < 2:
        raise ValueError(f"vqa_consensus_score: needs several human answers (VQAv2 has ten), got {len(answers)}; "
                         f"for one reference use answer_is_correct")
    normalized = normalize_answer(prediction)
    matches = [bool(normalized) and normalized == normalize_answer(a) for a in answers]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(answers)


def vqa_consensus_accuracy(predictions: Sequence[str], answer_lists: Sequence[Sequence[str]]) -> float:
    """The mean `vqa_consensus_score` (0.0 to 1.0): VQA accuracy as the VQA challenge computes it."""
    _check_lengths("vqa_consensus_accuracy", predictions, answer_lists)
    return sum(vqa_consensus_score(p, a) for p, a in zip(predictions, answer_lists)) / len(predictions)


def accuracy_by_type(predictions: Sequence[str], references: Sequence, types: Sequence[str]) -> dict[str, float]:
    """`vqa_accuracy` within each question type: {"color": 0.98, "count": 0.91, ...} (types sorted)."""
    _check_lengths("accuracy_by_type", predictions, references)
    if len(types) != len(predictions):
        raise ValueError(f"accuracy_by_type: {len(predictions)} predictions but {len(types)} types")
    correct, total = Counter(), Counter()
    for p, r, t in zip(predictions, references, types):
        total[t] += 1
        correct[t] += answer_is_correct(p, r)
    return {t: correct[t] / total[t] for t in sorted(total)}


# ---------------------------------------------------------------------------------------------------
# BLEU-4 (Papineni et al., 2002)


def caption_tokens(text: str) -> list[str]:
    """NFC, lowercase, then runs of letters, digits and combining marks of any script: the tokens BLEU and
    CIDEr-D compare (NFC: the same text in composed or decomposed form gives the same tokens)."""
    return _WORD.findall(unicodedata.normalize("NFC", str(text)).lower())


def ngram_counts(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu4(candidates: Sequence[str], references_list: Sequence, smooth: bool = False) -> float:
    """Corpus BLEU-4 (0.0 to 1.0).

    p_n = Σ_candidates Σ_ngrams min(count in candidate, max count in any one reference)
          / Σ_candidates number of candidate n-grams, for n = 1..4;
    BLEU = BP · exp(¼ Σ log p_n), BP = 1 if c > r else exp(1 - r/c), where c is the total candidate
    length and r the sum over candidates of the reference length closest to the candidate's (the shorter
    one on a tie). Without smoothing any p_n = 0 gives 0.0; `smooth=True` adds one to the numerator and
    denominator of p_n for n >= 2 (Lin and Och, 2004).
    """
    _check_lengths("bleu4", candidates, references_list)
    matched = [0] * 4
    total = [0] * 4
    candidate_length = reference_length = 0
    for candidate, references in zip(candidates, references_list):
        cand = caption_tokens(candidate)
        refs = [caption_tokens(r) for r in _as_reference_list(references)]
        if not refs:
            raise ValueError("bleu4: a candidate has no reference")
        candidate_length += len(cand)
        reference_length += min((abs(len(r) - len(cand)), len(r)) for r in refs)[1]
        for n in range(1, 5):
            cand_counts = ngram_counts(cand, n)
            max_ref_counts: Counter = Counter()
            for r in refs:
                max_ref_counts |= ngram_counts(r, n)  # | keeps the larger count of each n-gram
            matched[n - 1] += sum(min(c, max_ref_counts[g]) for g, c in cand_counts.items())
            total[n - 1] += max(len(cand) - n + 1, 0)
    if candidate_length == 0:
        return 0.0
    log_precision = 0.0
    for n in range(4):
        numerator, denominator = matched[n], total[n]
        if smooth and n > 0:
            numerator, denominator = numerator + 1, denominator + 1
        if numerator == 0 or denominator == 0:
            return 0.0
        log_precision += math.log(numerator / denominator) / 4
    brevity = 1.0 if candidate_length > reference_length else math.exp(1 - reference_length / candidate_length)
    return brevity * math.exp(log_precision)


# ---------------------------------------------------------------------------------------------------
# CIDEr-D (Vedantam et al., 2015)


def cider_d(candidates: Sequence[str], references_list: Sequence, sigma: float = 6.0) -> float:
    """Corpus CIDEr-D: the mean over candidates of

        CIDEr-D(c, S) = 1/4 Σ_{n=1..4} 10/m Σ_{s in S} exp(-(l_c - l_s)² / (2σ²))
                        · Σ_g min(w_c(g), w_s(g)) · w_s(g) / (‖w_c‖ ‖w_s‖)

    where w(g) = count(g) · log(N / max(1, df(g))) is the TF-IDF weight of n-gram g, N the number of
    candidates (images), df(g) the number of images whose references contain g, m = |S|, and l the
    length in tokens. Candidate weights are clipped by the reference's (the min), so repeating a good
    n-gram does not pay. An n whose candidate or reference has no n-grams adds 0. Scores are >= 0; 10
    is a perfect match of n-grams present in only one image. With one image every log(N/df) is 0 and so
    is the score: CIDEr-D needs a corpus.
    """
    _check_lengths("cider_d", candidates, references_list)
    cand_tokens = [caption_tokens(c) for c in candidates]
    ref_tokens = [[caption_tokens(r) for r in _as_reference_list(refs)] for refs in references_list]
    if any(not refs for refs in ref_tokens):
        raise ValueError("cider_d: a candidate has no reference")

    document_frequency: Counter = Counter()
    for refs in ref_tokens:
        document_frequency.update({g for r in refs for n in range(1, 5) for g in ngram_counts(r, n)})
    log_n = math.log(len(candidates))

    def tfidf(tokens):
        """Per n: ({ngram: weight}, norm)."""
        vectors = []
        for n in range(1, 5):
            weights = {g: c * (log_n - math.log(max(1, document_frequency[g]))) for g, c in ngram_counts(tokens, n).items()}
            vectors.append((weights, math.sqrt(sum(w * w for w in weights.values()))))
        return vectors

    total = 0.0
    for cand, refs in zip(cand_tokens, ref_tokens):
        cand_vectors = tfidf(cand)
        per_n = defaultdict(float)
        for ref in refs:
            penalty = math.exp(-((len(cand) - len(ref)) ** 2) / (2 * sigma ** 2))
            for n, ((wc, norm_c), (wr, norm_r)) in enumerate(zip(cand_vectors, tfidf(ref))):
                if norm_c == 0 or norm_r == 0:
                    continue
                overlap = sum(min(w, wr[g]) * wr[g] for g, w in wc.items() if g in wr)
                per_n[n] += penalty * overlap / (norm_c * norm_r)
        total += 10.0 / len(refs) * sum(per_n.values()) / 4
    return total / len(candidates)
