"""Training from pretrained HF parts (`config.init`): the fresh stages start from the HF weights.

The reference is the PyTorch model itself: a stage that starts from a pretrained LLM computes,
before any step, the LLM's logits on text; the upcycled MoE stage too (every expert a copy of the
dense FFN, combine weights summing to 1).
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import sentencepiece as spm
import transformers  # noqa: E402  (after the importorskip in hf_helpers)

from moe_lvlm.data import pipeline
from moe_lvlm.interop import hf_import
from moe_lvlm.parallel.mesh import make_mesh
from moe_lvlm.train.loop import StageRunner, stage_names
from tests.interop.hf_helpers import TOL, max_err, torch
from tests.interop.test_hf_import import SIZES, save, sentencepiece_bytes


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    """A demo run config with init.llm a tiny random LLaMA that ships a sentencepiece model."""
    from configs import demo

    llm_dir = tmp_path_factory.mktemp("llama")
    sp_bytes = sentencepiece_bytes(40)
    (llm_dir / "tokenizer.model").write_bytes(sp_bytes)
    pieces = spm.SentencePieceProcessor(model_proto=sp_bytes).get_piece_size()
    torch.manual_seed(0)
    hf = save(
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**SIZES, "vocab_size": pieces})),
        llm_dir,
    )
    run = demo.get_config()
    run.init = ml_collections.ConfigDict(dict(llm=str(llm_dir), vision=""))
    run.model.moe.update(dispatch="dropless", upcycle_noise_std=0.0)
    run.stages = "stage2,stage3"
    return run, hf, pieces


def start_logits(run, stage: str, ids: np.ndarray, workdir: Path) -> np.ndarray:
    """Logits of `stage`'s model, started as training starts it, on text-only `ids`."""
    cfg, pretrained = hf_import.pretrained_init(run)
    cfg[stage].init_from = "none"  # both start fresh, from the pretrained weights
    tokenizer = pipeline.load_tokenizer(cfg.data)
    mesh = make_mesh((1, 1, 1, 1), jax.devices()[:1])
    runner = StageRunner(cfg, stage, stage_names(cfg), workdir, mesh, tokenizer)
    try:
        params = runner.fresh_state(pretrained)["params"]
    finally:
        runner.close()
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    logits, _ = jax.jit(lambda p: runner.model.apply({"params": p}, ids, pos, jnp.ones_like(ids)))(
        params
    )
    return np.asarray(logits)


@pytest.mark.parametrize("stage", ["stage2", "stage3"])
def test_a_fresh_stage_computes_what_the_pretrained_llm_computes(pretrained_run, stage, tmp_path):
    run, hf, pieces = pretrained_run
    ids = np.random.RandomState(0).randint(3, pieces, (2, 9))
    logits = start_logits(run, stage, ids, tmp_path)
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
    assert max_err(logits[..., :pieces], want) <= TOL


def test_a_pretrained_tensor_with_no_place_in_the_model_is_an_error(pretrained_run, tmp_path):
    run, _, _ = pretrained_run
    cfg, pretrained = hf_import.pretrained_init(run)
    pretrained["decoder"]["extra_norm"] = {"scale": np.ones(4, np.float32)}
    mesh = make_mesh((1, 1, 1, 1), jax.devices()[:1])
    runner = StageRunner(
        cfg, "stage2", stage_names(cfg), tmp_path, mesh, pipeline.load_tokenizer(cfg.data)
    )
    try:
        with pytest.raises(ValueError, match="decoder/extra_norm/scale"):
            runner.fresh_state(pretrained)
    finally:
        runner.close()
