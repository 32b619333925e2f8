"""The PyTorch hand-off of an export, run through transformers: no generated id beyond the
tokenizer, ChatML generation stops at <|im_end|>, batched (left-padded) generation equals
one-at-a-time, a dropping capacity model warns, ByteFallback decoding as docs/interop.md says."""

import json

import numpy as np
import pytest
import transformers

from moe_lvlm.data.tokenizer import train_tokenizer
from moe_lvlm.export import export_workdir
from moe_lvlm.generate import stop_ids
from moe_lvlm.interop import hf_export, hf_tokenizer
from moe_lvlm.workdir import load_trained
from tests.generate.tiny_workdir import make_workdir, reference_greedy, tiny_model_config
from tests.interop.hf_helpers import random_params, torch


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{template: (workdir, export dir)} for a vicuna_v1 and a chatml tiny workdir."""
    out = {}
    for template in ("vicuna_v1", "chatml"):
        root = tmp_path_factory.mktemp(template)
        workdir = make_workdir(root, template=template)
        out[template] = workdir, export_workdir(workdir, root / "hf")[0]
    return out


def _hf(directory):
    model = transformers.LlavaForConditionalGeneration.from_pretrained(directory).eval()
    return model, transformers.AutoTokenizer.from_pretrained(directory)


def test_sampling_never_picks_an_id_beyond_the_tokenizer(exported):
    workdir, directory = exported["vicuna_v1"]
    model, tok = _hf(directory)
    vocab = load_trained(workdir).tokenizer.vocab_size
    rows = model.config.text_config.vocab_size
    assert rows > vocab  # the model has embedding rows with no piece
    gen = json.loads((directory / "generation_config.json").read_text())
    assert gen["suppress_tokens"] == list(range(vocab, rows))
    torch.manual_seed(0)
    ids = tok(["What color is the 3?"] * 4, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, do_sample=True, temperature=3.0, top_k=0, top_p=1.0,
                             max_new_tokens=40, min_new_tokens=40)  # fmt: skip
    new = out[:, ids["input_ids"].shape[1] :]
    assert new.shape[1] == 40 and int(new.max()) < vocab


def test_chatml_generation_stops_at_im_end(exported, tmp_path):
    workdir, _ = exported["chatml"]
    trained = load_trained(workdir)
    sp = trained.tokenizer
    prompt = sp.encode("What color is the 3?")
    # Make <|im_end|> the greedy choice where the model's 3rd token would come: its lm_head
    # column becomes twice that token's.
    head = np.array(trained.params["decoder"]["lm_head"])
    greedy = lambda p, steps, stops: reference_greedy(  # noqa: E731  (ids within the tokenizer)
        trained.model, p, prompt, None, steps, stops, vocab_size=sp.vocab_size
    )
    free = greedy(trained.params, 3, ())
    head[:, sp.im_end_id] = 2 * head[:, free[2]]
    params = {**trained.params, "decoder": {**trained.params["decoder"], "lm_head": head}}
    want = greedy(params, 8, stop_ids("chatml", sp))
    assert want[-1] == sp.im_end_id and len(want) < 8
    hf_export.export(params, trained.model_config, tmp_path / "hf", sp, template="chatml")
    model, tok = _hf(tmp_path / "hf")
    assert sp.im_end_id in model.generation_config.eos_token_id
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    assert out[0, len(prompt) :].tolist() == want  # stops right after <|im_end|>
    text = tok.decode(out[0, len(prompt) :], skip_special_tokens=True)
    assert "<|im_end|>" not in text and text == sp.decode(want[:-1])


def test_batched_left_padded_generation_equals_one_at_a_time(exported):
    _, directory = exported["vicuna_v1"]
    model, tok = _hf(directory)
    assert tok.padding_side == "left"
    prompts = ["What color is the 3?", "item 4 is", "Is there a 5 in the image? yes no red",
               "How many digits", "USER: ASSISTANT: A chat", "where is the 7?"]  # fmt: skip
    with torch.no_grad():
        batch = tok(prompts, return_tensors="pt", padding=True)
        out = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        batched = out[:, batch["input_ids"].shape[1] :].tolist()
        single = []
        for p in prompts:
            one = tok([p], return_tensors="pt")
            o = model.generate(**one, max_new_tokens=6, min_new_tokens=6, do_sample=False)
            single.append(o[0, one["input_ids"].shape[1] :].tolist())
    assert batched == single


def test_export_of_a_dropping_capacity_model_warns(tmp_path):
    cfg = tiny_model_config("capacity")
    cfg.image_token_id = 4
    cfg.moe.update(capacity_factor_train=1.5, capacity_factor_eval=1.0)  # k * 1.0 < E = 4
    with pytest.warns(UserWarning, match="drops tokens.*differ from moe_lvlm.generate"):
        hf_export.export(random_params(cfg), cfg, tmp_path / "hf")
    cfg.moe.capacity_factor_eval = 2.0  # no drops at eval: only training differs
    with pytest.warns(UserWarning, match="drops tokens.*not the training forward"):
        hf_export.export(random_params(cfg), cfg, tmp_path / "hf2")


def test_byte_fallback_decoding_differs_only_as_documented(tmp_path):
    """A run of byte pieces that is not valid UTF-8 as a whole: sentencepiece keeps its valid
    characters and writes U+FFFD per invalid byte; HF's ByteFallback writes U+FFFD per byte."""
    sp = train_tokenizer(["abc def ghi"] * 20, 300, byte_fallback=True)
    hf_tokenizer.write_tokenizer(sp, tmp_path)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    a = sp.encode("abc")
    cases = {  # bytes of the run -> (sentencepiece, HF)
        (0xC3, 0xA9): ("é", "é"),  # valid UTF-8: identical
        (0xFF, 0xFE): ("\ufffd\ufffd", "\ufffd\ufffd"),  # no valid character: identical
        (0xC3, 0xA9, 0xFF): ("é\ufffd", "\ufffd\ufffd\ufffd"),
        (0x41, 0xFF, 0x42): ("A\ufffdB", "\ufffd\ufffd\ufffd"),
    }
    for run, (want_sp, want_hf) in cases.items():
        ids = a + [sp.piece_to_id(f"<0x{b:02X}>") for b in run] + a
        assert sp.decode(ids) == f"abc{want_sp} abc", run
        assert fast.decode(ids, skip_special_tokens=True).strip() == f"abc{want_hf} abc", run
