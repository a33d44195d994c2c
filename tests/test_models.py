"""Model I/O: Meta round trip, untying, bad input from the library and the CLI."""

import json

import pytest
import torch
from click.testing import CliRunner

from spinquant.cli import cli
from spinquant.errors import SpinQuantError
from spinquant.formats import load_model
from spinquant.formats.meta import permute_hf_to_meta, permute_meta_to_hf, save_meta


def test_meta_round_trip_identical_logits(tiny_model, tmp_path):
    ids = torch.randint(0, tiny_model.config.vocab_size, (1, 40))
    with torch.no_grad():
        before = tiny_model(ids).logits
        save_meta(tiny_model, tmp_path / "meta")
        params = json.loads((tmp_path / "meta" / "params.json").read_text())
        assert params["n_kv_heads"] == 2 and params["hidden_dim"] == 128
        back = load_model(tmp_path / "meta")
        assert torch.equal(back(ids).logits, before)
        back.save_pretrained(tmp_path / "hf")
        again = load_model(tmp_path / "hf")
        assert torch.equal(again(ids).logits, before)


def test_meta_layout_is_interleaved_rope(tiny_model, tmp_path):
    save_meta(tiny_model, tmp_path)
    sd = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    assert next(iter(sd)) == "norm.weight"  # ExecuTorch reads the dtype from the first tensor
    wq_hf = tiny_model.model.layers[0].self_attn.q_proj.weight
    wq_meta = sd["layers.0.attention.wq.weight"]
    hd = 16
    # Meta's row 2j and 2j+1 of a head are the HF rotate-half pair (j, j + hd/2)
    assert torch.equal(wq_meta[0], wq_hf[0]) and torch.equal(wq_meta[1], wq_hf[hd // 2])
    assert torch.equal(permute_meta_to_hf(permute_hf_to_meta(wq_hf, 4), 4), wq_hf)


def test_untied_on_load(tiny_model_dir):
    m = load_model(tiny_model_dir)
    assert not m.config.tie_word_embeddings
    assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    assert torch.equal(m.lm_head.weight, m.model.embed_tokens.weight)


def test_bf16_checkpoint_loads_as_float32_bit_identically(tiny_model, tmp_path):
    """load_model reads a bf16 checkpoint at its own dtype and upcasts tensor by tensor (less peak memory): the same
    float32 model as from_pretrained(dtype=float32); untie=False (evaluation) keeps the tie and the logits."""
    from transformers import LlamaForCausalLM

    tiny_model.config.tie_word_embeddings = True
    tiny_model.tie_weights()
    tiny_model.to(torch.bfloat16).save_pretrained(tmp_path)
    ref = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, ref.config.vocab_size, (1, 24))
    with torch.no_grad():
        want = ref(ids).logits
        for untie in (True, False):
            m = load_model(tmp_path, untie=untie)
            assert all(t.dtype == torch.float32 for t in m.state_dict().values() if t.is_floating_point())
            assert (m.lm_head.weight is m.model.embed_tokens.weight) is not untie
            assert torch.equal(m(ids).logits, want)


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(SpinQuantError, match="Hugging Face hub"):
        load_model("meta-llama/Llama-3.2-1B")


def _run_cli(args):
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.output


def _assert_one_line_error(code, output, pattern):
    assert code != 0
    assert "Traceback" not in output
    lines = [l for l in output.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert pattern in lines[0], lines[0]


def test_cli_missing_path(tmp_path):
    code, out = _run_cli(["rotate", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    _assert_one_line_error(code, out, "no such path")
    assert not (tmp_path / "o").exists()


def test_cli_not_a_llama(tmp_path):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    code, out = _run_cli(["rotate", "--model", str(d), "--out", str(tmp_path / "o")])
    _assert_one_line_error(code, out, "unsupported architecture 'gpt2'")


def test_cli_dir_without_model(tmp_path):
    (tmp_path / "empty").mkdir()
    code, out = _run_cli(["rotate", "--model", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    _assert_one_line_error(code, out, "is not a model")


def test_cli_meta_params_mismatch(tiny_model, tmp_path):
    save_meta(tiny_model, tmp_path / "meta")
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    params["n_kv_heads"] = 4
    (tmp_path / "meta" / "params.json").write_text(json.dumps(params))
    code, out = _run_cli(["rotate", "--model", str(tmp_path / "meta"), "--out", str(tmp_path / "o")])
    _assert_one_line_error(code, out, "params.json does not match the checkpoint")


def test_cli_corrupt_meta_checkpoint(tiny_model, tmp_path):
    save_meta(tiny_model, tmp_path / "meta")
    (tmp_path / "meta" / "consolidated.00.pth").write_bytes(b"not a checkpoint")
    code, out = _run_cli(["rotate", "--model", str(tmp_path / "meta"), "--out", str(tmp_path / "o")])
    _assert_one_line_error(code, out, "corrupt")


def test_tied_meta_checkpoint_without_output_weight(tiny_model, tmp_path):
    save_meta(tiny_model, tmp_path)
    sd = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    del sd["output.weight"]  # Meta's Llama 3.2 1B/3B checkpoints are tied
    torch.save(sd, tmp_path / "consolidated.00.pth")
    model = load_model(tmp_path)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, tiny_model.config.vocab_size, (1, 20))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_model(ids).logits)
