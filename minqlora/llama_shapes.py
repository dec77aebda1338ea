"""The shapes of a LLaMA-shaped model, from its Hugging Face config keys (lesson 09; lesson 13
adds LLaMA-2-70B). memory.py counts bytes from these shapes.

A block (hidden h, intermediate m, H heads, K key-value heads) holds seven linear weights:
q and o (h x h), k and v (h x h*K/H: grouped-query attention shares each key and value head
among H/K query heads; K = H without num_key_value_heads), gate and up (h -> m), down (m -> h),
and two RMSNorms (h each). The model adds an embedding and an lm_head (vocab x h each) and a
final norm; with tie_word_embeddings (SmolLM2, lesson 12) the two are one tensor.

Worked example: LLaMA-2-70B (h 8192, m 28672, 80 blocks, 64 heads, 8 key-value heads) has k and
v of 8192 x 1024, 855,654,400 parameters per block and 68,976,648,192 in all.
"""
CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads")
PRESETS = {  # Hugging Face config.json values of the LLaMA-1 models used in the QLoRA paper
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                     num_hidden_layers=32, num_attention_heads=32),
    "llama-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                      num_hidden_layers=40, num_attention_heads=40),
    "llama-33b": dict(vocab_size=32000, hidden_size=6656, intermediate_size=17920,
                      num_hidden_layers=60, num_attention_heads=52),
    "llama-65b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=22016,
                      num_hidden_layers=80, num_attention_heads=64),
}
LATER = {  # the model FSDP + QLoRA (Answer.AI, 2024) trains on two 24 GB GPUs (lesson 13)
    "llama-2-70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_shapes(config) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of the seven linears of one block.

    >>> linear_shapes("llama-7b")[4], linear_shapes("llama-2-70b")[1]
    (('gate_proj', 4096, 11008), ('k_proj', 8192, 1024))
    """
    c = llama_config(config)
    h, m = c["hidden_size"], c["intermediate_size"]
    kv = h * c.get("num_key_value_heads", c["num_attention_heads"]) // c["num_attention_heads"]
    mlp = [("gate_proj", h, m), ("up_proj", h, m), ("down_proj", m, h)]
    return [("q_proj", h, h), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", h, h)] + mlp


def count_params(config) -> int:
    """All parameters of the model.

    >>> count_params("llama-65b"), count_params("llama-2-70b")
    (65285660672, 68976648192)
    """
    c = llama_config(config)
    h, L = c["hidden_size"], c["num_hidden_layers"]
    per_block = sum(i * o for _, i, o in linear_shapes(c)) + 2 * h
    heads = 1 if c.get("tie_word_embeddings") else 2     # SmolLM2 shares lm_head and embedding
    return L * per_block + heads * c["vocab_size"] * h + h


def llama_config(config) -> dict:
    """A preset's config (PRESETS or LATER), or `config` itself once its keys are checked."""
    if isinstance(config, str):
        if config not in PRESETS and config not in LATER:
            raise ValueError(f"memory: unknown preset {config!r}; choose one of "
                             f"{list(PRESETS) + list(LATER)} or pass a dict with Hugging Face "
                             "LLaMA keys")
        return {**PRESETS, **LATER}[config]
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"memory: config is missing {missing}; expected the Hugging Face LLaMA "
                         f"keys {list(CONFIG_KEYS)}")
    for k in CONFIG_KEYS:
        check_count(config[k], f"memory: config[{k!r}]", 1)
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", 1)
    check_count(kv, "memory: config['num_key_value_heads']", 1)
    if heads % kv or config["hidden_size"] % heads:
        raise ValueError(f"memory: num_attention_heads ({heads}) must divide hidden_size "
                         f"({config['hidden_size']}) and be a multiple of num_key_value_heads "
                         f"({kv})")
    return config


def check_count(value, what: str, lowest: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise ValueError(f"{what} must be an integer >= {lowest}, got {value!r}")
