"""Official GQA accuracy: raw exact match over balanced questions, binary vs open by structural type."""

from __future__ import annotations

import pytest

from mdpd_vl.errors import UserError
from mdpd_vl.eval.gqa import gqa_accuracy, questions_from_index


def q(answer: str, structural: str, semantic: str = "attr", balanced: bool = True) -> dict:
    return {"imageId": "n1", "question": "?", "answer": answer, "fullAnswer": answer,
            "isBalanced": balanced, "types": {"structural": structural, "semantic": semantic,
                                              "detailed": "x"}}


QUESTIONS = {
    "1": q("yes", "verify"),
    "2": q("no", "logical", "obj"),
    "3": q("red", "query"),
    "4": q("table", "query", "cat"),
    "5": q("blue", "query", balanced=False),  # not balanced: never scored
}


def test_exact_match_balanced_binary_open():
    preds = {"1": "yes", "2": "No", "3": "red", "4": "the table", "5": "wrong"}
    m = gqa_accuracy(preds, QUESTIONS)
    # Hits: 1 (yes) and 3 (red); "No" and "the table" are wrong: no normalisation at all.
    assert m["accuracy"] == 50.0 and m["num_questions"] == 4
    assert m["binary"] == 50.0 and m["open"] == 50.0
    assert m["per_structural"] == {"logical": 0.0, "query": 50.0, "verify": 100.0}
    assert m["per_semantic"] == {"attr": 100.0, "cat": 0.0, "obj": 0.0}


def test_unbalanced_questions_need_no_prediction_and_unknown_ids_are_refused():
    preds = {"1": "yes", "2": "no", "3": "red", "4": "table"}
    assert gqa_accuracy(preds, QUESTIONS)["accuracy"] == 100.0
    with pytest.raises(UserError, match="not in the questions file"):
        gqa_accuracy({**preds, "99": "x"}, QUESTIONS)
    # the official script ignores them; allow_unknown restores that
    assert gqa_accuracy({**preds, "99": "x"}, QUESTIONS, allow_unknown=True)["accuracy"] == 100.0


def test_empty_group_is_none():
    m = gqa_accuracy({"1": "yes"}, {"1": q("yes", "verify")})
    assert m["binary"] == 100.0 and m["open"] is None


def test_integer_keys_are_matched_as_strings():
    assert gqa_accuracy({1: "yes"}, {"1": q("yes", "verify")})["accuracy"] == 100.0


def test_canonical_index_items():
    items = [{"question_id": "7", "answer": "cup", "structural": "query", "semantic": "obj",
              "is_balanced": True}]
    assert gqa_accuracy({"7": "cup"}, questions_from_index(items))["open"] == 100.0
    with pytest.raises(UserError, match="is_balanced"):
        questions_from_index([{"question_id": "7", "answer": "cup", "structural": "query",
                               "semantic": "obj"}])


def test_bad_input():
    with pytest.raises(UserError, match="no prediction for 1 balanced questions.*questionId 4"):
        gqa_accuracy({"1": "yes", "2": "no", "3": "red"}, QUESTIONS)
    with pytest.raises(UserError, match="not a string"):
        gqa_accuracy({"1": ["yes"]}, {"1": q("yes", "verify")})
    with pytest.raises(UserError, match="types.structural"):
        gqa_accuracy({"1": "yes"}, {"1": {"answer": "yes", "isBalanced": True, "types": {}}})
    with pytest.raises(UserError, match="isBalanced"):
        gqa_accuracy({"1": "yes"}, {"1": {"answer": "yes"}})
    with pytest.raises(UserError, match="no question has isBalanced"):
        gqa_accuracy({}, {"5": q("blue", "query", balanced=False)})
