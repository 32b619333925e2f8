"""StableLM-2, Phi-2 and Qwen-1 decoders: tiny random transformers models imported, logits equal
to PyTorch's (fp32, max abs <= 1e-4). Qwen-1 has no transformers class: its architecture is
Qwen2's (RMSNorm, qkv bias, SwiGLU), so a tiny Qwen2 model's safetensors are rewritten into
Qwen-1's key names (fused `c_attn`, `w1`/`w2`/`c_proj`) and config fields, then imported."""

import json

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from moe_lvlm.interop import hf_import
from tests.interop.hf_helpers import TOL, max_err, randomize_torch, torch
from tests.interop.test_hf_import import SIZES, decoder_logits

MHA = dict(SIZES, num_key_value_heads=4)


def _check(model, directory, ids):
    with torch.no_grad():
        want = model(torch.tensor(ids)).logits.numpy()
    model_cfg, params = hf_import.import_decoder(directory)
    assert max_err(decoder_logits(model_cfg, params, ids), want) <= TOL
    return model_cfg


def _save(model, path):
    randomize_torch(model)
    model.eval()
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("parallel", [False, True])
def test_stablelm_matches(tmp_path, parallel):
    torch.manual_seed(0)
    config = transformers.StableLmConfig(
        **SIZES,
        use_qkv_bias=True,
        use_parallel_residual=parallel,
        partial_rotary_factor=0.25,
        layer_norm_eps=1e-5,
    )
    hf = _save(transformers.StableLmForCausalLM(config), tmp_path)
    ids = np.random.RandomState(0).randint(0, 64, (2, 12))
    d = _check(hf, tmp_path, ids).decoder
    assert (d.norm, d.rotary_fraction, d.parallel_block, d.qkv_bias) == (
        "layer",
        0.25,
        parallel,
        True,
    )


def test_phi_matches(tmp_path):
    torch.manual_seed(0)
    config = transformers.PhiConfig(**MHA, partial_rotary_factor=0.4, hidden_act="gelu_new")
    # head_dim 8 * 0.4 = 3.2 -> 3 rotary features would be odd; use head_dim 10 (4 rotate).
    config.hidden_size, config.num_attention_heads, config.num_key_value_heads = 40, 4, 4
    hf = _save(transformers.PhiForCausalLM(config), tmp_path)
    ids = np.random.RandomState(1).randint(0, 64, (2, 12))
    d = _check(hf, tmp_path, ids).decoder
    assert (d.ffn, d.activation, d.parallel_block, d.out_bias, d.head_bias) == (
        "mlp",
        "gelu_tanh",
        True,
        True,
        True,
    )


def qwen1_from_qwen2(src, dst, num_layers: int) -> None:
    """Rewrites a saved Qwen2ForCausalLM (MHA) into a Qwen-1 (QWenLMHeadModel) checkpoint."""
    hf = json.loads((src / "config.json").read_text())
    tensors, out = load_file(src / "model.safetensors"), {}
    rename = {
        "model.embed_tokens.weight": "transformer.wte.weight",
        "model.norm.weight": "transformer.ln_f.weight",
        "lm_head.weight": "lm_head.weight",
    }
    for old, new in rename.items():
        out[new] = tensors[old]
    for i in range(num_layers):
        a, b = f"model.layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            out[f"{b}attn.c_attn.{kind}"] = np.concatenate(
                [tensors[f"{a}self_attn.{n}_proj.{kind}"] for n in "qkv"]
            )
        pairs = {
            "self_attn.o_proj": "attn.c_proj",
            "input_layernorm": "ln_1",
            "post_attention_layernorm": "ln_2",
            "mlp.up_proj": "mlp.w1",
            "mlp.gate_proj": "mlp.w2",
            "mlp.down_proj": "mlp.c_proj",
        }
        for old, new in pairs.items():
            out[f"{b}{new}.weight"] = tensors[f"{a}{old}.weight"]
    dst.mkdir()
    save_file(out, dst / "model.safetensors")
    qwen1 = dict(
        model_type="qwen",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_hidden_layers=num_layers,
        num_attention_heads=hf["num_attention_heads"],
        kv_channels=hf["hidden_size"] // hf["num_attention_heads"],
        intermediate_size=2 * hf["intermediate_size"],
        layer_norm_epsilon=hf["rms_norm_eps"],
        rotary_pct=1.0,
        rotary_emb_base=hf["rope_parameters"]["rope_theta"],
        no_bias=True,
        use_dynamic_ntk=True,
        use_logn_attn=True,
        seq_length=8192,
        tie_word_embeddings=False,
    )
    (dst / "config.json").write_text(json.dumps(qwen1))


def test_qwen1_layout_matches_qwen2(tmp_path):
    torch.manual_seed(0)
    hf = _save(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**MHA)), tmp_path / "q2")
    qwen1_from_qwen2(tmp_path / "q2", tmp_path / "q1", MHA["num_hidden_layers"])
    ids = np.random.RandomState(2).randint(0, 64, (2, 12))
    d = _check(hf, tmp_path / "q1", ids).decoder
    assert (d.norm, d.qkv_bias, d.mlp_dim) == ("rms", True, MHA["intermediate_size"])
