from __future__ import annotations

import pytest

from airflow_llm_async.core.quality import ARTICLE_RULES, QualitySpec

GOOD = (
    "大语言模型正在改变数据工程:自动化清洗、文档生成和代码审查都能借助模型完成,"
    "团队效率明显提升,成本持续下降。"
)


def rules(failures):
    return [f["rule"] for f in failures]


def test_the_article_rules_pass_a_good_answer():
    assert len(GOOD) >= 50
    assert ARTICLE_RULES.check(GOOD) == []


def test_short_answers_fail_min_chars_first():
    assert rules(ARTICLE_RULES.check("抱歉")) == ["min_chars", "refusal_markers"]
    assert rules(ARTICLE_RULES.check("   ")) == ["min_chars"]
    assert rules(ARTICLE_RULES.check(None)) == ["min_chars"]


def test_refusal_markers_are_found_anywhere():
    failures = ARTICLE_RULES.check(GOOD + "抱歉,出现错误。")
    assert rules(failures) == ["refusal_markers"]
    assert "错误" in failures[0]["detail"] and "抱歉" in failures[0]["detail"]


def test_regex_finish_reason_and_json_rules():
    spec = QualitySpec(regex=r"^\{", reject_finish_reasons=["length", "content_filter"], require_json=True)
    assert spec.check('{"a": 1}', "stop") == []
    assert rules(spec.check("{not json", "length")) == ["finish_reason", "require_json"]
    assert rules(spec.check("plain", "content_filter")) == ["regex", "finish_reason", "require_json"]


def test_an_empty_spec_passes_everything():
    assert QualitySpec().check("") == []
    assert QualitySpec.from_dict(None) == QualitySpec()


def test_round_trip_through_a_dict():
    spec = QualitySpec(min_chars=10, refusal_markers=("x",), regex="a+", reject_finish_reasons=("length",))
    assert QualitySpec.from_dict(spec.to_dict()) == spec
    assert spec.to_dict() == {
        "min_chars": 10,
        "refusal_markers": ["x"],
        "regex": "a+",
        "reject_finish_reasons": ["length"],
        "require_json": False,
        "json_schema": None,
    }


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"min_char": 5}, "unknown quality rule"),
        ({"min_chars": -1}, "min_chars"),
        ({"min_chars": "50"}, "min_chars"),
        ({"refusal_markers": "抱歉"}, "refusal_markers"),
        ({"refusal_markers": [""]}, "refusal_markers"),
        ({"regex": "("}, "does not compile"),
        ("min_chars=5", "must be a dict"),
        ({"json_schema": "object"}, "must be a JSON Schema object"),
        ({"json_schema": {"type": "objekt"}}, "not a valid JSON Schema"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, fragment):
    with pytest.raises(ValueError, match=fragment):
        QualitySpec.from_dict(spec)


SCHEMA = {
    "type": "object",
    "required": ["label", "score"],
    "properties": {"label": {"enum": ["positive", "negative"]}, "score": {"type": "number"}},
}


def test_json_schema_checks_the_parsed_answer():
    spec = QualitySpec(json_schema=SCHEMA)
    assert spec.check('{"label": "positive", "score": 0.9}') == []
    assert spec.check('{"label": "neutral", "score": 1}') == [
        {"rule": "json_schema", "detail": "at label: 'neutral' is not one of ['positive', 'negative']"}
    ]
    assert rules(spec.check('{"label": "negative"}')) == ["json_schema"]
    assert rules(spec.check("not json")) == ["require_json"]
    assert QualitySpec.from_dict(spec.to_dict()) == spec
