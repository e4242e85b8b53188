"""Model sharding with accelerate's device maps (``load_model(device_map=...)``, ``--device-map``).

This machine has no GPU, so every map here puts all layers on the CPU; what is checked is that loading
through a device map, and running under the hooks accelerate installs for a map over several devices,
leaves the trace unchanged (indices and masses equal), and that bad maps end in one sentence. That the
layers land on several GPUs is accelerate's part and runs only on a multi-GPU machine (docs/gpu.md).
"""

from __future__ import annotations

import json

import pytest
import torch

from sparsetrace.config import TraceConfig
from sparsetrace.datasets.essays import haystack_text
from sparsetrace.errors import UsageError
from sparsetrace.store import Trace
from sparsetrace.tracing.models import check_device_map, dispatch, infer_device_map, load_model, model_devices
from sparsetrace.tracing.tracer import tokenize, trace_ids

CONFIG = TraceConfig.of(block_size=16, top_k=5, chunk_size=96)


def per_module_map(num_layers: int) -> dict:
    """Every module of a Llama model named, as a multi-GPU map names them (here all on the CPU)."""
    return {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(num_layers)},
            "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


def assert_same_trace(got: Trace, want: Trace, what: str) -> None:
    assert got.num_layers == want.num_layers
    for layer in range(want.num_layers):
        (gi, gm), (wi, wm) = got.layer(layer), want.layer(layer)
        assert torch.equal(gi, wi), f"{what}: layer {layer} indices differ"
        assert torch.equal(gm, wm), f"{what}: layer {layer} masses differ (max {(gm - wm).abs().max():.2e})"


@pytest.fixture(scope="module")
def reference(smollm):
    model, tokenizer = smollm
    ids, _ = tokenize(tokenizer, haystack_text(3000), max_tokens=300)
    return ids, trace_ids(model, ids, CONFIG)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["everything", "per-module", "auto"])
def test_device_map_on_one_device_gives_the_same_trace(reference, name):
    ids, want = reference
    device_map = {"everything": {"": "cpu"}, "per-module": per_module_map(30), "auto": "auto"}[name]
    model, _ = load_model(device_map=device_map)
    assert [d.type for d in model_devices(model)] == ["cpu"]
    got = trace_ids(model, ids, CONFIG)
    assert got.meta["device"] == "cpu"
    assert_same_trace(got, want, name)
    print(f"{name}: {got.num_layers} layers, sparsity {got.sparsity:.3f}, identical to the plain load")


@pytest.mark.slow
def test_trace_under_accelerate_hooks_is_the_same(reference):
    """A map over several devices makes transformers call ``accelerate.dispatch_model``, which wraps every
    module in a hook that moves its inputs to the module's device; force those hooks on the CPU (the one
    device here) and trace: the registered attention, the KV cache and ``take_chunk`` run as they would
    with layers on several GPUs, and the trace does not change."""
    from accelerate import dispatch_model

    ids, want = reference
    model, _ = load_model()
    model = dispatch_model(model, device_map=per_module_map(30), main_device="cpu", force_hooks=True)
    assert hasattr(model.model.layers[7], "_hf_hook") and hasattr(model.lm_head, "_hf_hook")
    assert_same_trace(trace_ids(model, ids, CONFIG), want, "hooked")


@pytest.mark.slow
def test_dispatch_of_a_built_model(reference):
    """``dispatch`` (for models built from a config, as bench/gpu_trace.py does) on a named strategy:
    on a machine without GPUs accelerate keeps everything on the CPU and the trace is unchanged."""
    ids, want = reference
    model, _ = load_model()
    model = dispatch(model, "auto")
    assert set(model.hf_device_map.values()) == {"cpu"}
    assert_same_trace(trace_ids(model, ids, CONFIG), want, "dispatch auto")


@pytest.mark.slow
def test_bad_device_maps_are_one_sentence(smollm):
    config = smollm[0].config
    cases = [
        ({"": "cpu", "model.layer.3": "cpu"}, "names no module"),
        ({"model.layers": "cpu", "lm_head": "cpu"}, "gives no device to model.embed_tokens.weight"),
        ({"": "disk"}, "offloads nothing to disk"),
        ({"": "tpu"}, "is not a device"),
        ("fastest", "is not one of auto"),
        ({}, "non-empty"),
    ]
    if not torch.cuda.is_available():
        cases.append(({"": "cuda:0"}, "PyTorch sees 0 CUDA GPU"))
    for device_map, message in cases:
        with pytest.raises(UsageError, match=message) as err:
            check_device_map(config, device_map)
        assert "\n" not in str(err.value)


@pytest.mark.slow
def test_cli_device_map(tmp_path, capsys, reference):
    """``--device-map FILE`` traces exactly as ``--device cpu``; bad files and mixed flags are one sentence,
    exit 2, nothing written."""
    from sparsetrace.cli import main

    text = tmp_path / "essay.txt"
    text.write_text(haystack_text(3000), encoding="utf-8")
    good = tmp_path / "map.json"
    good.write_text(json.dumps(per_module_map(30)))
    flags = ["--text-file", str(text), "--max-tokens", "300", "--block-size", "16", "--top-k", "5",
             "--chunk-size", "96", "--no-progress"]
    assert main(["trace", *flags, "--device-map", str(good), "--out", str(tmp_path / "mapped")]) == 0
    assert main(["trace", *flags, "--device", "cpu", "--out", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    assert_same_trace(Trace.load(tmp_path / "mapped"), Trace.load(tmp_path / "plain"), "--device-map FILE")

    (tmp_path / "broken.json").write_text('{"": "cpu",')
    (tmp_path / "list.json").write_text('["cpu"]')
    (tmp_path / "unknown.json").write_text('{"": "cpu", "transformer.h.0": "cpu"}')
    bad = [
        (["--device-map", str(tmp_path / "missing.json")], "no such file"),
        (["--device-map", str(tmp_path / "broken.json")], "is not JSON"),
        (["--device-map", str(tmp_path / "list.json")], "holds a JSON list"),
        (["--device-map", str(tmp_path / "unknown.json")], "names no module"),
        (["--device-map", "auto", "--device", "cpu"], "give only one of them"),
    ]
    for extra, message in bad:
        out = tmp_path / "bad"
        code = main(["trace", *flags, *extra, "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, (extra, err)
        assert not out.exists()


def test_auto_map_of_llama_8b_over_two_gpus_keeps_layers_whole():
    """What ``--device-map auto`` computes on a two-GPU machine, here from the Llama-3.1-8B shape on the meta
    device and two H200-sized memories: every decoder layer whole on one GPU, both GPUs used, the
    embeddings on the first and the head on the last (the order the hidden state flows)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    device_map = infer_device_map(model, "auto", max_memory={0: "139GiB", 1: "139GiB"})
    layers = {int(k.split(".")[2]): v for k, v in device_map.items() if k.startswith("model.layers.")}
    print("layers per GPU:", {d: sum(1 for v in layers.values() if v == d) for d in (0, 1)})
    assert sorted(layers) == list(range(32)) and all(k.count(".") == 2 for k in device_map
                                                      if k.startswith("model.layers."))
    assert device_map["model.embed_tokens"] == 0 and device_map["lm_head"] == 1
    assert set(layers.values()) == {0, 1} and list(layers.values()) == sorted(layers.values())
