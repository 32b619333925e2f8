"""Import of tiny random HF models: the JAX outputs must match PyTorch's (fp32, max abs <= 1e-4)."""

import io
import json

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import sentencepiece as spm
import transformers  # noqa: E402  (after the importorskip in hf_helpers)
from safetensors.numpy import load_file, save_file

from moe_lvlm.interop import hf_import
from moe_lvlm.interop.safetensors_io import Checkpoint
from moe_lvlm.models.lvlm import build_model
from moe_lvlm.models.vit import VisionEncoder
from tests.interop.hf_helpers import TOL, jit_apply, max_err, randomize_torch, torch

SIZES = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=16,
    patch_size=8,
)


def save(model, path, **kw):
    randomize_torch(model)
    model.eval()
    model.save_pretrained(path, **kw)
    return model


def decoder_logits(model_cfg, params, ids):
    cfg = ml_collections.ConfigDict(model_cfg.to_dict())
    cfg.image_token_id = 0
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    logits, _ = jit_apply(build_model(cfg), params, ids, pos, jnp.ones_like(ids))
    return np.asarray(logits)


@pytest.mark.parametrize(
    "name, make, shard",
    [
        ("llama", lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES)), None),
        (
            "mistral",
            lambda: transformers.MistralForCausalLM(
                transformers.MistralConfig(**SIZES, sliding_window=None, rope_theta=5e4)
            ),
            None,
        ),
        ("qwen2", lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SIZES)), "8KB"),
        (
            "qwen3",
            lambda: transformers.Qwen3ForCausalLM(
                transformers.Qwen3Config(**SIZES, head_dim=16, tie_word_embeddings=True)
            ),
            "8KB",
        ),
    ],
)
def test_decoder_logits_match(tmp_path, name, make, shard):
    torch.manual_seed(0)
    hf = save(make(), tmp_path, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (tmp_path / "model.safetensors.index.json").exists()
    model_cfg, params = hf_import.import_decoder(tmp_path)
    d = model_cfg.decoder
    assert (d.qkv_bias, d.qk_norm) == (name == "qwen2", name == "qwen3")
    ids = np.random.RandomState(0).randint(0, 64, (2, 12))
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
    assert max_err(decoder_logits(model_cfg, params, ids), want) <= TOL


def vision_features(model_cfg, params, pixels):
    encoder = VisionEncoder(ml_collections.FrozenConfigDict(model_cfg))
    images = jnp.asarray(pixels.transpose(0, 2, 3, 1))
    features, _ = jit_apply(encoder, params["vision"], images)
    return np.asarray(features)


@pytest.mark.parametrize(
    "kind, select, keep_cls, shard",
    [
        ("clip_vision", -2, True, None),
        ("clip", -1, False, "8KB"),
        ("siglip_vision", 1, False, "8KB"),
    ],
)
def test_vision_hidden_states_match(tmp_path, kind, select, keep_cls, shard):
    torch.manual_seed(0)
    if kind == "clip_vision":
        hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION))
    elif kind == "clip":
        text = dict(VISION, vocab_size=50)
        del text["image_size"], text["patch_size"]
        config = transformers.CLIPConfig(text_config=text, vision_config=VISION, projection_dim=16)
        hf = transformers.CLIPModel(config)
    else:
        hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION))
    save(hf, tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard)
    model_cfg, params = hf_import.import_vision(tmp_path, select, keep_cls)
    v = model_cfg.vision
    assert v.class_token == (kind != "siglip_vision")
    assert v.activation == ("gelu_tanh" if kind == "siglip_vision" else "quick_gelu")
    pixels = np.random.RandomState(1).randn(2, 3, 16, 16).astype(np.float32)
    tower = hf.vision_model if kind == "clip" else hf
    with torch.no_grad():
        hidden = tower(pixel_values=torch.tensor(pixels), output_hidden_states=True)
    want = hidden.hidden_states[select].numpy()
    if v.class_token and not keep_cls:
        want = want[:, 1:]
    assert max_err(vision_features(model_cfg, params, pixels), want) <= TOL


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    save(transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES)), path)
    return path


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_unsupported_model_type_names_it(tmp_path, llama_dir):
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).write_bytes((llama_dir / f).read_bytes())
    edit_config(tmp_path, model_type="gpt2")
    with pytest.raises(hf_import.CheckpointError, match="model_type 'gpt2'"):
        hf_import.import_decoder(tmp_path)
    edit_config(tmp_path, model_type="llama", rope_parameters={"rope_type": "llama3"})
    with pytest.raises(hf_import.CheckpointError, match="rope_type='llama3'"):
        hf_import.import_decoder(tmp_path)


def test_unsupported_vision_tower_names_it(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dinov2", **VISION}))
    with pytest.raises(hf_import.CheckpointError, match="model_type 'dinov2' is not an importable"):
        hf_import.import_vision(tmp_path)


def test_missing_and_misshaped_tensors_name_file_and_key(tmp_path, llama_dir):
    (tmp_path / "config.json").write_bytes((llama_dir / "config.json").read_bytes())
    tensors = load_file(llama_dir / "model.safetensors")
    key = "model.layers.1.self_attn.k_proj.weight"
    save_file({k: v for k, v in tensors.items() if k != key}, tmp_path / "model.safetensors")
    with pytest.raises(hf_import.CheckpointError, match=f"tensor {key} is missing"):
        hf_import.import_decoder(tmp_path)
    tensors[key] = tensors[key][:8]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(
        hf_import.CheckpointError, match=r"model.safetensors: tensor .*k_proj.* shape"
    ):
        hf_import.import_decoder(tmp_path)


def test_bfloat16_tensors_read_without_torch(tmp_path):
    from safetensors.torch import save_file as torch_save

    x = torch.randn(3, 5).to(torch.bfloat16)
    torch_save({"x": x, "y": torch.arange(4, dtype=torch.int64)}, tmp_path / "model.safetensors")
    ckpt = Checkpoint(tmp_path)
    assert str(ckpt["x"].dtype) == "bfloat16"
    np.testing.assert_array_equal(ckpt["x"].astype(np.float32), x.float().numpy())
    np.testing.assert_array_equal(ckpt["y"], np.arange(4))


def test_with_pretrained_keeps_run_choices(tmp_path, llama_dir):
    from configs import models

    run = models.tiny()
    run.vision.select_layer = -2
    cfg, params = hf_import.with_pretrained(run, llm_dir=str(llama_dir))
    assert cfg.decoder.moe_layers == run.decoder.moe_layers  # upcycled later, at stage III
    assert cfg.decoder.embed_dim == SIZES["hidden_size"] and "vision" not in params
    assert params["decoder"]["embedding"].shape == (64, 32)


def sentencepiece_bytes(vocab_size: int) -> bytes:
    """A LLaMA-style BPE tokenizer (no <image>: the project adds it) with pad-free ids."""
    out = io.BytesIO()
    text = "what is in the image a red cat on the left two digits 42 " * 3
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([text] * 10),
        model_writer=out,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        character_coverage=1.0,
        minloglevel=2,
        num_threads=1,
    )
    return out.getvalue()


def test_pretrained_init_takes_the_llm_tokenizer_and_grows_the_vocabulary(tmp_path):
    from configs import demo
    from moe_lvlm.data import pipeline
    from moe_lvlm.train.stages import dense_variant

    sp_bytes = sentencepiece_bytes(40)
    sp = spm.SentencePieceProcessor(model_proto=sp_bytes)
    vocab = sp.get_piece_size()
    torch.manual_seed(0)
    hf = save(
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**SIZES, "vocab_size": vocab})),
        tmp_path,
    )
    (tmp_path / "tokenizer.model").write_bytes(sp_bytes)

    run = demo.get_config()
    run.init = ml_collections.ConfigDict(dict(llm=str(tmp_path), vision=""))
    cfg, params = hf_import.pretrained_init(run)
    assert cfg.data.tokenizer == str(tmp_path / "tokenizer.model") and not run.data.tokenizer
    tok = pipeline.load_tokenizer(cfg.data)
    text = "what is in the image? a red cat"
    assert tok.encode(text) == sp.encode(text)
    # <image>, <|im_start|>, <|im_end|> appended: 3 rows, each the mean of the pretrained ones.
    assert cfg.model.decoder.vocab_size == vocab + 3 == tok.vocab_size
    embed = hf.model.embed_tokens.weight.detach().numpy()
    head = hf.lm_head.weight.detach().numpy()
    np.testing.assert_array_equal(params["decoder"]["embedding"][:vocab], embed)
    np.testing.assert_allclose(
        params["decoder"]["embedding"][vocab:], [embed.mean(0)] * 3, atol=1e-6
    )
    np.testing.assert_allclose(
        params["decoder"]["lm_head"][:, vocab:].T, [head.mean(0)] * 3, atol=1e-6
    )

    # The stage I model computes with them what the LLM computes in PyTorch.
    model_cfg = dense_variant(cfg.model)
    model_cfg.image_token_id = tok.image_token_id
    ids = np.random.RandomState(0).randint(3, vocab, (1, 9))
    logits = decoder_logits(model_cfg, params, ids)
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
    assert max_err(logits[..., :vocab], want) <= TOL


def test_pretrained_init_takes_a_tokenizer_json(tmp_path, llama_dir):
    """An LLM shipping a BPE tokenizer.json (StableLM-2, Phi-2): it becomes data.tokenizer and
    the embedding grows to its ids."""
    from configs import demo
    from moe_lvlm.data import tokenizer as tokenizer_lib
    from tests.data import bpe_files

    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).write_bytes((llama_dir / f).read_bytes())
    bpe_files.write_tokenizer_json(tmp_path, vocab_size=90, full_alphabet=False)
    run = demo.get_config()
    run.init = ml_collections.ConfigDict(dict(llm=str(tmp_path), vision=""))
    cfg, params = hf_import.pretrained_init(run)
    assert cfg.data.tokenizer == str(tmp_path / "tokenizer.json")
    tok = tokenizer_lib.load(cfg.data.tokenizer)
    assert cfg.model.decoder.vocab_size == tok.vocab_size > SIZES["vocab_size"]
    assert params["decoder"]["embedding"].shape[0] == tok.vocab_size


def test_pretrained_init_refuses_mismatched_inputs(tmp_path, llama_dir):
    from configs import demo

    run = demo.get_config()
    run.init = ml_collections.ConfigDict(dict(llm=str(llama_dir), vision=""))
    with pytest.raises(hf_import.CheckpointError, match="has no tokenizer \\(tokenizer.model"):
        hf_import.pretrained_init(run)
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).write_bytes((llama_dir / f).read_bytes())
    edit_config(tmp_path, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2)
    with pytest.raises(hf_import.CheckpointError, match="a mixtral MoE decoder; init.llm takes"):
        hf_import.with_pretrained(run.model, llm_dir=str(tmp_path))
