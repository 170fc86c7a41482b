"""Official VQA accuracy: leave-one-out scores, normalisation only when the answers disagree, the
official punctuation/period regexes (bugs included), answer_id identity and bad input."""

from __future__ import annotations

import pytest

from mdpd_vl.errors import UserError
from mdpd_vl.eval.vqa import (
    process_digit_article,
    process_punctuation,
    question_accuracy,
    vqa_accuracy,
)


def answers(*texts: str) -> list[dict]:
    return [{"answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)]


def ann(qid: int, texts: list[str], qtype: str = "what is", atype: str = "other") -> dict:
    return {"question_id": qid, "image_id": 1, "question_type": qtype, "answer_type": atype,
            "multiple_choice_answer": texts[0], "answers": answers(*texts)}


@pytest.mark.parametrize("m,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0),
                                        (10, 1.0)])
def test_leave_one_out_score(m, expected):
    # m annotators say "cat", the rest "dog": [m*min(1,(m-1)/3) + (10-m)*min(1,m/3)] / 10.
    acc = question_accuracy("cat", answers(*(["cat"] * m + ["dog"] * (10 - m))))
    assert acc == pytest.approx(expected)


def test_normalisation_only_when_answers_disagree():
    same = answers(*["2"] * 10)
    assert question_accuracy("two", same) == 0.0          # identical GTs: raw comparison
    assert question_accuracy("2", same) == 1.0
    assert question_accuracy("2 ", same) == 1.0           # but strip() always applies
    assert question_accuracy("Yes", answers(*["yes"] * 10)) == 0.0  # no lowercasing either
    mixed = answers(*(["2"] * 9 + ["3"]))
    assert question_accuracy("two", mixed) == 1.0          # disagreeing GTs: "two" -> "2"
    assert question_accuracy("The Two.", mixed) == 1.0
    # Normalisation also reaches the GTs: "a dog" / "dog!" / "Dog" all become "dog".
    assert question_accuracy("dog", answers(*(["a dog", "dog!", "Dog"] * 3 + ["cat"]))) == 1.0


def test_newlines_and_tabs_become_spaces():
    assert question_accuracy("red\tcar\n", answers(*["red car"] * 10)) == 1.0


@pytest.mark.parametrize("text,expected", [
    ("hi!", "hi "),              # no space next to it, no digit comma: replaced by a space
    ("red, white", "red white"),  # touches a space: deleted
    ("1,000", "1000"),            # (\d)(,)(\d) anywhere: every mark is deleted
    ("t-shirt", "t shirt"),
    ("end.", "end"),              # a period not followed by a digit goes
    ("2.5", "2.5"),               # ... one followed by a digit stays
    (".5", ".5"),
    ("1.", "1"),                  # buggy "lookbehind": a real (?<!\d) would have kept this period
    ("yes?", "yes "),
    ("it's", "it's"),             # the apostrophe is not in the official list
    ("a:b", "a:b"),               # neither is the colon
])
def test_process_punctuation(text, expected):
    assert process_punctuation(text) == expected


def test_period_strip_count_is_re_unicode():
    # The official call passes re.UNICODE (32) as the count: only 32 periods are removed.
    assert process_punctuation("." * 40) == "." * 8


@pytest.mark.parametrize("text,expected", [
    ("The Two dogs", "2 dogs"), ("none", "0"), ("an apple", "apple"), ("dont", "don't"),
    ("TEN", "10"), ("somebody'd", "somebodyd"), ("  a  ", ""),
])
def test_process_digit_article(text, expected):
    assert process_digit_article(text) == expected


def test_answer_id_keeps_duplicate_answers_apart():
    with_ids = answers(*(["cat"] * 4 + ["dog"] * 6))
    assert question_accuracy("cat", with_ids) == pytest.approx(0.9 + 0.1)  # m = 4 -> 1.0
    # Without ids, the official dict-inequality "leave one out" drops all four identical records.
    bare = [{"answer": "cat"}] * 4 + [{"answer": "dog", "answer_id": i} for i in range(6)]
    assert question_accuracy("cat", bare) == pytest.approx(0.6)


def test_overall_and_per_type_rounding():
    anns = [ann(1, ["yes"] * 10, "is the", "yes/no"),
            ann(2, ["2"] * 1 + ["3"] * 9, "how many", "number"),
            ann(3, ["red"] * 10, "what color", "other")]
    preds = {1: "yes", 2: "two", 3: "blue"}  # 1.0, 0.3, 0.0
    m = vqa_accuracy(preds, anns)
    assert m["overall"] == 43.33
    assert m["per_answer_type"] == {"yes/no": 100.0, "number": 30.0, "other": 0.0}
    assert m["per_question_type"] == {"is the": 100.0, "how many": 30.0, "what color": 0.0}
    assert m["num_questions"] == 3
    # String keys in the predictions are accepted (JSON object keys).
    assert vqa_accuracy({"1": "yes", "2": "two", "3": "blue"}, anns) == m


def test_bad_input():
    anns = [ann(1, ["yes"] * 10), ann(2, ["no"] * 10)]
    with pytest.raises(UserError, match="no prediction for 1 of 2 questions.*question_id 2"):
        vqa_accuracy({1: "yes"}, anns)
    with pytest.raises(UserError, match="not in the annotations"):
        vqa_accuracy({1: "yes", 2: "no", 3: "x"}, anns)
    with pytest.raises(UserError, match="not a string"):
        vqa_accuracy({1: "yes", 2: 2}, anns)
    with pytest.raises(UserError, match="appears twice"):
        vqa_accuracy({1: "yes"}, [ann(1, ["a"] * 10), ann(1, ["b"] * 10)])
    broken = ann(1, ["yes"] * 10)
    del broken["answer_type"]
    with pytest.raises(UserError, match="answer_type"):
        vqa_accuracy({1: "yes"}, [broken])
    with pytest.raises(UserError, match="string 'answer'"):
        vqa_accuracy({1: "yes"}, [ann(1, ["yes"] * 9) | {"answers": ["yes"] * 10}])
    with pytest.raises(UserError, match="no annotations"):
        vqa_accuracy({}, [])
