"""A JSON schema's properties are written in the order the schema lists them, whatever order
its other keys come in (the compile cache's canonical text keeps that order)."""

import json

import gpt
from gpt.constraints import Constraint


def test_properties_come_out_in_the_schemas_order_not_sorted(tiny_gpt):
    props = {"zeta": {"type": "boolean"}, "alpha": {"type": "boolean"}, "mid": {"enum": [1, 2]}}
    schema = {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}
    tok = gpt.get_tokenizer("byte")
    params = [
        gpt.SamplingParams(
            max_new_tokens=60, temperature=1.0, seed=s, constraint=Constraint.json_schema(schema)
        )
        for s in range(3)
    ]
    for out in gpt.complete(tiny_gpt, tok, ["x"] * 3, params):
        assert out.finish_reason == "stop"
        assert list(json.loads(out.text)) == ["zeta", "alpha", "mid"]


def test_reordering_properties_makes_another_constraint_but_other_keys_do_not():
    a = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    swapped_props = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}}
    swapped_keys = {"properties": {"b": {"type": "integer"}, "a": {"type": "string"}}, "type": "object"}
    assert Constraint.json_schema(a) != Constraint.json_schema(swapped_props)
    assert Constraint.json_schema(a) == Constraint.json_schema(swapped_keys)
