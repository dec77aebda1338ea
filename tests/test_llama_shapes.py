"""LLaMA shapes from Hugging Face config keys: the published parameter counts, grouped-query
attention, and configs that cannot be a LLaMA refused with a message."""
import pytest

from minqlora.llama_shapes import LATER, PRESETS, count_params, linear_shapes, llama_config


def test_llama_2_70b_has_grouped_query_attention():
    """meta-llama/Llama-2-70b-hf: 8 key-value heads for 64 query heads, so k and v project
    8192 -> 1024; its config's shapes give 68,976,648,192 parameters, the "70B"."""
    shapes = dict((name, (i, o)) for name, i, o in linear_shapes("llama-2-70b"))
    assert shapes["k_proj"] == shapes["v_proj"] == (8192, 1024)
    assert shapes["q_proj"] == shapes["o_proj"] == (8192, 8192)
    assert count_params("llama-2-70b") == 68_976_648_192
    no_gqa = {k: v for k, v in LATER["llama-2-70b"].items() if k != "num_key_value_heads"}
    assert count_params(no_gqa) - count_params("llama-2-70b") == 80 * 2 * 8192 * (8192 - 1024)


def test_presets_are_unchanged_by_key_value_heads():
    """The LLaMA-1 presets have no num_key_value_heads: every head has its own k and v."""
    for name in PRESETS:
        h = PRESETS[name]["hidden_size"]
        assert all(o == h for n, _, o in linear_shapes(name) if n in ("k_proj", "v_proj"))
    assert llama_config("llama-7b") is PRESETS["llama-7b"]


@pytest.mark.parametrize("change, message", [
    (dict(num_key_value_heads=0), r"num_key_value_heads'\] must be an integer >= 1"),
    (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
    (dict(num_attention_heads=48), "must divide hidden_size"),
])
def test_configs_that_are_not_a_llama_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        llama_config({**PRESETS["llama-7b"], **change})
