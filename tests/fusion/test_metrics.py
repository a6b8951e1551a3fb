"""Metrics against hand-computed values (the working is in the comments)."""
import math

import pytest

from fusion.evaluation.metrics import (accuracy_by_type, answer_is_correct, bleu4, caption_tokens, cider_d,
                                       normalize_answer, vqa_accuracy, vqa_consensus_accuracy, vqa_consensus_score)

LOG2 = math.log(2)


# --- answers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, expected", [
    ("Red", "red"),
    ("  The Red-circle. ", "red circle"),
    ("a blue square", "blue square"),
    ("Two", "2"),
    ("2", "2"),
    ("three!", "3"),
    ("top   left", "top left"),
    ("Yes.", "yes"),
    ("an orange", "orange"),
    ("don't", "dont"),                 # an apostrophe joins, as in the VQA script's contractions
    ("isn\u2019t", "isnt"),
    ("1,000", "1000"),                 # a thousands separator goes
    ("1.5", "1.5"),                    # a decimal point stays
    ("end.", "end"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_accuracy_is_normalised_exact_match():
    predictions = ["Red.", "two", "a blue square", "left", "circle"]
    references = ["red", "2", "blue square", "right", ["square", "circle"]]
    assert vqa_accuracy(predictions, references) == pytest.approx(4 / 5)
    assert vqa_accuracy(["the red circle"], ["red circle"]) == 1.0
    assert vqa_accuracy(["red circles"], ["red circle"]) == 0.0  # no stemming: exact after normalising


def test_an_answer_that_normalises_to_nothing_is_never_correct():
    assert not answer_is_correct("", "the") and not answer_is_correct(".", "") and not answer_is_correct("a", "an")
    assert not answer_is_correct(" ", " ") and not answer_is_correct("?!", "...")


@pytest.mark.parametrize("prediction", ["A", "a", "A.", "(A)", " a) "])
def test_a_multiple_choice_letter_a_is_an_answer_not_an_article(prediction):
    # dropping the articles would leave nothing: the answer keeps them (the official VQA script scores "A" 1.0)
    assert normalize_answer(prediction) == "a"
    assert answer_is_correct(prediction, "A") and not answer_is_correct(prediction, "B")
    assert vqa_accuracy(["A", "B", "C", "D"], ["A", "B", "C", "D"]) == 1.0
    assert vqa_consensus_score(prediction, ["A"] * 10) == 1.0
    assert normalize_answer("The") == "the" and normalize_answer("a circle") == "circle"  # articles still go


@pytest.mark.parametrize("prediction, reference, correct", [
    ("\u0939\u0930", "\u0939\u0930\u093e", False),                # हर (every) is not हरा (green): a vowel sign is a letter
    ("\u0928\u0940\u0932", "\u0928\u0940\u0932\u093e", False),  # नील (indigo) is not नीला (blue)
    ("\u0939\u0940\u0930\u093e", "\u0939\u0930\u093e", False),  # हीरा (diamond) is not हरा
    ("\u0e14\u0e35", "\u0e14\u0e33", False),                      # ดี (good) is not ดำ (black)
    ("\u0939\u0930\u093e.", "\u0939\u0930\u093e", True),
    ("cafe\u0301", "caf\u00e9", True),                               # decomposed and composed é: the same word
    ("cafe\u0301", "cafe", False),                                    # an accent is not punctuation
])
def test_combining_marks_are_part_of_their_word(prediction, reference, correct):
    assert answer_is_correct(prediction, reference) is correct


@pytest.mark.parametrize("prediction, reference, correct", [
    ("5", ".5", False), (".5", ".5", True), ("0.5", "0.5", True), ("5", "0.5", False),
    ("No.1", "no 1", True), ("Fig.2", "fig 2", True), ("p.5", "p 5", True),  # after a letter: punctuation
    ("\uff12", "2", True),                              # full-width digit (NFKC)
    ("\uff32\uff45\uff44", "red", True),              # full-width letters
    ("\uff11,\uff10\uff10\uff10", "1000", True),     # full-width digits with a thousands separator
])
def test_a_decimal_point_before_a_digit_stays_and_compatibility_forms_match(prediction, reference, correct):
    assert answer_is_correct(prediction, reference) is correct


def test_vqa_consensus_accuracy_is_the_vqa_challenge_formula():
    # ten human answers: min(1, matches among the other nine / 3), averaged over the ten left out in turn
    assert vqa_consensus_score("no", ["yes"] * 9 + ["no"]) == pytest.approx(0.3)  # 9 x 1/3 + 1 x 0, / 10
    assert vqa_consensus_score("no", ["no"] * 3 + ["yes"] * 7) == pytest.approx(0.9)  # 3 x 2/3 + 7 x 1, / 10
    assert vqa_consensus_score("Yes.", ["yes"] * 4 + ["no"] * 6) == 1.0
    assert vqa_consensus_accuracy(["no", "yes"], [["yes"] * 9 + ["no"], ["yes"] * 10]) == pytest.approx(0.65)
    assert vqa_accuracy(["no"], [["yes"] * 9 + ["no"]]) == 1.0  # vqa_accuracy: any reference matches
    with pytest.raises(ValueError, match="several human answers"):
        vqa_consensus_score("no", ["no"])


def test_accuracy_by_type():
    by_type = accuracy_by_type(["red", "3", "yes", "no", "2"], ["red", "2", "yes", "yes", "two"],
                               ["color", "count", "existence", "existence", "count"])
    assert by_type == {"color": 1.0, "count": 0.5, "existence": 0.5}


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        vqa_accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="types"):
        accuracy_by_type(["a"], ["a"], [])
    with pytest.raises(ValueError, match="no predictions"):
        bleu4([], [])


# --- BLEU-4 -----------------------------------------------------------------------------------------


def test_tokens():
    assert caption_tokens("A red circle at the Top-Left.") == ["a", "red", "circle", "at", "the", "top", "left"]
    assert caption_tokens("Un café très élevé, l'église") == ["un", "café", "très", "élevé", "l", "église"]
    assert caption_tokens("snake_case") == ["snake", "case"]


def test_accented_captions_score_as_written():
    assert bleu4(["un café près de l'église"], ["un café près de l'église"]) == 1.0
    assert bleu4(["un cafe pres de l eglise"], ["un café près de l'église"]) < 1.0  # accents are letters


def test_combining_marks_stay_in_caption_tokens():
    assert caption_tokens("\u0939\u093f\u0928\u094d\u0926\u0940 \u092d\u093e\u0937\u093e") == [
        "\u0939\u093f\u0928\u094d\u0926\u0940", "\u092d\u093e\u0937\u093e"]  # हिन्दी भाषा: two words
    assert caption_tokens("\u0e20\u0e32\u0e29\u0e32\u0e44\u0e17\u0e22 \u0e14\u0e35") == [
        "\u0e20\u0e32\u0e29\u0e32\u0e44\u0e17\u0e22", "\u0e14\u0e35"]   # ภาษาไทย ดี
    assert caption_tokens("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645") == [
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"]   # می‌خواهم: a zero-width non-joiner inside a word
    assert caption_tokens("cafe\u0301 cre\u0300me") == ["caf\u00e9", "cr\u00e8me"]  # NFC: as if composed
    # "लाल गोला ऊपर बाएँ" vs "लील गीली ऊपर बाएं" share one word in four: no bigram matches, BLEU 0 (split at the
    # vowel signs, the letters left over were the same and BLEU was 1.0)
    assert bleu4(["\u0932\u093e\u0932 \u0917\u094b\u0932\u093e \u090a\u092a\u0930 \u092c\u093e\u090f\u0901"],
                 ["\u0932\u0940\u0932 \u0917\u0940\u0932\u0940 \u090a\u092a\u0930 \u092c\u093e\u090f\u0902"]) == 0.0


def test_every_combining_mark_is_a_word_character():
    """The marks are collected from planes 0, 1 and 14 only: that is all of them in this Python's Unicode."""
    import sys
    import unicodedata

    marks = [chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)).startswith("M")]
    assert caption_tokens("x" + "".join(marks)) == [unicodedata.normalize("NFC", "x" + "".join(marks))]


def test_bleu_identical_is_one():
    assert bleu4(["a red circle at the top left."], [["A red circle at the top left"]]) == pytest.approx(1.0)


def test_bleu_worked_example():
    # candidate:  a red circle is at the top left   (8 tokens)
    # reference:  a red circle at the top left      (7 tokens) -> c = 8 > r = 7, BP = 1
    # 1-grams: 7 of 8 match (not "is")                                          p1 = 7/8
    # 2-grams: a red, red circle, at the, the top, top left match; circle is, is at do not   p2 = 5/7
    # 3-grams: a red circle, at the top, the top left match; 3 with "is" do not  p3 = 3/6
    # 4-grams: only "at the top left" matches                                   p4 = 1/5
    # BLEU = (7/8 * 5/7 * 1/2 * 1/5) ** (1/4) = (1/16) ** (1/4) = 0.5
    assert bleu4(["a red circle is at the top left"], [["a red circle at the top left"]]) == pytest.approx(0.5)


def test_bleu_brevity_penalty():
    # candidate "a red circle at the top" is a prefix of the 7-token reference: every p_n = 1,
    # c = 6 < r = 7, so BLEU = BP = exp(1 - 7/6)
    assert bleu4(["a red circle at the top"], ["a red circle at the top left"]) == pytest.approx(math.exp(-1 / 6))


def test_bleu_closest_reference_length_and_clipping():
    # references of 9 and 3 tokens; the candidate has 7: the closest is 9 (|7-9| = 2 < |7-3| = 4).
    # candidate: "red red red red red red red" -> p1 = clipped 1 / 7 ... but p2..p4 = 0 -> 0 without smoothing
    refs = [["a red circle and a blue square at left", "red red circle"]]
    assert bleu4(["red red red red red red red"], refs) == 0.0
    # with a 7-token candidate equal to the first 7 tokens of the 9-token reference: all p_n = 1,
    # r = 9 (closest), BP = exp(1 - 9/7)
    assert bleu4(["a red circle and a blue square"], refs) == pytest.approx(math.exp(1 - 9 / 7))
    # tie: candidate of 5 tokens, references of 4 and 6 tokens -> the shorter (4) is used, c > r, BP = 1
    assert bleu4(["one two three four five"], [["one two three four five six", "one two three four"]]) \
        == pytest.approx(1.0)


def test_bleu_no_matching_4gram_is_zero_unless_smoothed():
    # "the cat is on the mat" vs "the cat sat on the mat": p1 = 5/6, p2 = 3/5, p3 = 1/4, p4 = 0/3
    cand, refs = ["the cat is on the mat"], [["the cat sat on the mat"]]
    assert bleu4(cand, refs) == 0.0
    # smoothed (add one for n >= 2): (5/6 * 4/6 * 2/5 * 1/4) ** (1/4), BP = 1 (c = r = 6 gives exp(0))
    assert bleu4(cand, refs, smooth=True) == pytest.approx((5 / 6 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25)


def test_bleu_is_corpus_level():
    # counts are summed over the corpus before dividing: candidate 1 is the 8-token example above
    # (7/8, 5/7, 3/6, 1/5), candidate 2 is identical to its reference "blue square" (2/2, 1/1, 0/0, 0/0).
    # p = 9/10, 6/8, 3/6, 1/5; c = 10 > r = 9
    got = bleu4(["a red circle is at the top left", "blue square"],
                [["a red circle at the top left"], ["blue square"]])
    assert got == pytest.approx((9 / 10 * 6 / 8 * 3 / 6 * 1 / 5) ** 0.25)


# --- CIDEr-D ----------------------------------------------------------------------------------------


def test_cider_worked_example():
    # Two images: refs {"red circle"} and {"blue square"}; N = 2, every reference n-gram has df = 1,
    # so each weighs count * log 2.
    # Image 1, candidate "red circle" = its reference: cosine 1 for n = 1 and n = 2, nothing for n = 3, 4,
    #   length penalty exp(0) = 1 -> 10 * (1 + 1 + 0 + 0) / 4 = 5.
    # Image 2, candidate "blue circle" vs "blue square": unigrams {blue, circle} vs {blue, square}, each
    #   weighing log 2 ("circle" is in image 1's references only, df = 1): dot = (log 2)^2,
    #   norms sqrt(2) log 2 each -> cosine 1/2; bigrams "blue circle" vs "blue square" share nothing
    #   -> 10 * (1/2) / 4 = 1.25.
    # Corpus: (5 + 1.25) / 2 = 3.125
    assert cider_d(["red circle", "blue circle"], [["red circle"], ["blue square"]]) == pytest.approx(3.125)


def test_cider_clipping_and_length_penalty():
    # Image 1: candidate "red circle red circle" vs reference "red circle".
    #   unigrams: candidate weights red = circle = 2 log 2, reference red = circle = log 2;
    #     clipped dot = 2 * min(2 log2, log2) * log2 = 2 (log 2)^2; norms sqrt(8) log 2 and sqrt(2) log 2
    #     -> 2 / 4 = 1/2
    #   bigrams: candidate "red circle" x2 (2 log 2), "circle red" (df 0 -> max(1, 0) = 1 -> log 2);
    #     reference "red circle" (log 2): dot = (log 2)^2, norms sqrt(5) log 2 and log 2 -> 1/sqrt(5)
    #   trigrams, 4-grams: the reference has none -> 0
    #   length penalty: l_c = 4, l_s = 2 -> exp(-4 / 72)
    #   -> 10 * exp(-1/18) * (1/2 + 1/sqrt(5)) / 4
    # Image 2: candidate = reference "blue square" -> 5 (as above).
    expected_1 = 10 * math.exp(-1 / 18) * (0.5 + 1 / math.sqrt(5)) / 4
    got = cider_d(["red circle red circle", "blue square"], [["red circle"], ["blue square"]])
    assert got == pytest.approx((expected_1 + 5) / 2)


def test_cider_orders_candidates_sensibly():
    refs = [["a red circle at the top left", "a red circle in the top left corner"],
            ["a blue square at the center", "a blue square in the middle"],
            ["a green triangle at the bottom right", "a green triangle at the bottom right corner"]]
    exact = ["a red circle at the top left", "a blue square at the center", "a green triangle at the bottom right"]
    partial = ["a red square at the top", "a blue circle", "a green triangle"]
    wrong = ["a yellow star", "a yellow star", "a yellow star"]
    scores = [cider_d(c, refs) for c in (exact, partial, wrong)]
    assert scores[0] > scores[1] > scores[2] >= 0.0
    # n-grams found in every image's references ("a", "at the" here) carry no weight: with one image,
    # log(N / df) = 0 for all and the score is 0 by definition
    assert cider_d(["a red circle"], [["a red circle"]]) == 0.0


def test_bleu_clips_repeated_ngrams():
    # candidate: seven times "red"; reference "red red circle" (c = 7 > r = 3, BP = 1), smoothed:
    # p1 = min(7, 2) / 7 = 2/7 (unclipped it would be 7/7)
    # p2 = ("red red": min(6, 1) = 1, + 1) / (6 + 1) = 2/7;  p3 = (0 + 1) / (5 + 1);  p4 = (0 + 1) / (4 + 1)
    got = bleu4(["red red red red red red red"], [["red red circle"]], smooth=True)
    assert got == pytest.approx((2 / 7 * 2 / 7 * 1 / 6 * 1 / 5) ** 0.25)
