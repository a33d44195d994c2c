#!/usr/bin/env python
"""How far apart are a right and a wrong .pte? The measurements behind the .pte verification rule.

For each model (the shared reference model and small random configs, one with sharp attention), the
run's own ExecuTorch checkpoint and deliberately wrong ones go through executorch's export_llama and
runtime, and are compared with our fake-quant model on the same windows:
- right: what ``spinquant export`` writes;
- no-r4-fold: down_proj without the R4 half folded in (exported with --use_spin_quant native);
- rope-unpermuted: q/k rows left in HF's rotate-half order;
- group-64: block linears quantized at group 64 (scales repeated into the group-32 layout);
- float-output: the output layer in float (preq_mode 8da4w) where ours is int8;
- other-seed: the same model quantized after another seed's random Hadamard rotation.
Printed per case: KL(ours || pte) nats/token, perplexity ratio pte/ours, top-1 agreement, max relative
logit difference; and KL(float || ours) for scale. Writes benchmarks/results/verification_margins.{md,json}.

    python scripts/bench_verification_margins.py
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from spinquant.evaluate import evaluation_ids, evaluation_windows, hf_logits_fn
from spinquant.formats.executorch import executorch_params, executorch_state_dict
from spinquant.fusion import Rotations, fuse_and_rotate
from spinquant.hadamard import hadamard_matrix
from spinquant.formats import load_model, load_tokenizer
from spinquant.formats.meta import permute_rope_rows
from spinquant.formats.hf import untie_embeddings
from spinquant.pipeline import compare_logits
from spinquant.pte import PteModel, run_export_llama
from spinquant.quant.apply import WeightQuantConfig, quantize_model
from spinquant.quant.primitives import dequantize_weight, quantize_weight, weight_scales
from spinquant.quant.scheme import META_8DA4W, QuantScheme
from _common import SHARED

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
VARIANTS = ("right", "no-r4-fold", "rope-unpermuted", "group-64", "float-output", "other-seed")


def quantized(base, seed: int, scheme: QuantScheme):
    m = copy.deepcopy(base)
    fuse_and_rotate(m, Rotations.random_hadamard(m, seed))
    return quantize_model(m, scheme, WeightQuantConfig(method="rtn", clip_search=True), None, progress=False)


def requantized(sd: dict, key: str, w: torch.Tensor, group: int) -> None:
    """Put weight ``w`` into the checkpoint at ``key`` as int4 RTN of ``group``, scales in the group-32 layout."""
    s = weight_scales(w, 4, group)
    sd[f"{key}.weight"] = quantize_weight(w, s, 4, group)
    s32 = s.repeat_interleave(group // 32, dim=1) if group > 32 else s
    sd[f"{key}.scales"] = s32.float().contiguous()
    sd[f"{key}.zeros"] = torch.zeros_like(sd[f"{key}.scales"])


def variant_checkpoint(name: str, ours, other, scheme: QuantScheme) -> tuple[dict, dict, str]:
    """(state dict, params, preq_mode) of one case."""
    cfg = ours.config
    sd = executorch_state_dict(other if name == "other-seed" else ours, scheme)
    params = executorch_params(ours, scheme)
    mode = "8da4w_output_8da8w"
    n = cfg.num_hidden_layers
    if name == "no-r4-fold":
        h = hadamard_matrix(cfg.intermediate_size).float()
        for i in range(n):
            key = f"layers.{i}.feed_forward.w2"
            w = dequantize_weight(sd[f"{key}.weight"], sd[f"{key}.scales"], 32) @ h  # H symmetric orthonormal: undoes W H
            requantized(sd, key, w, 32)
    elif name == "rope-unpermuted":
        for i in range(n):
            for hf, meta in (("self_attn.q_proj", "wq"), ("self_attn.k_proj", "wk")):
                key = f"layers.{i}.attention.{meta}"
                for part in ("weight", "scales", "zeros"):
                    sd[f"{key}.{part}"] = permute_rope_rows(hf, sd[f"{key}.{part}"], cfg, to_meta=False).contiguous()
    elif name == "group-64":
        for key in [k[: -len(".scales")] for k in sd if k.startswith("layers.") and k.endswith(".scales")]:
            w = dequantize_weight(sd[f"{key}.weight"], sd[f"{key}.scales"], 32)
            requantized(sd, key, w, 64)
    elif name == "float-output":
        sd["output.weight"] = ours.lm_head.effective_weight().float().clone()  # its int8 weights, dequantized
        del sd["output.scales"], sd["output.zeros"]
        mode = "8da4w"
    return sd, params, mode


def measure(base, windows: torch.Tensor, label: str, work: Path, seed_float=None) -> list[dict]:
    scheme = META_8DA4W
    ours = quantized(base, 0, scheme)
    other = quantized(base, 1, scheme)
    ours_fn = hf_logits_fn(ours)
    float_fn = hf_logits_fn(base)
    kl_float = compare_logits(float_fn, ours_fn, windows)["kl_ours_to_pte"]  # KL(float || ours)
    rows = []
    for name in VARIANTS:
        d = work / f"{label}-{name}"
        d.mkdir(parents=True)
        sd, params, mode = variant_checkpoint(name, ours, other, scheme)
        torch.save(sd, d / "consolidated.00.pth")
        (d / "params.json").write_text(json.dumps(params))
        cfg = ours.config
        t = time.perf_counter()
        try:
            run_export_llama(d, d / "model.pte", mode, 32, True, cfg.bos_token_id, [cfg.eos_token_id], 1024, False)
            m = compare_logits(ours_fn, PteModel(d / "model.pte"), windows)
            row = {"model": label, "case": name, "kl_ours_to_pte": m["kl_ours_to_pte"], "ppl_ratio": m["ppl_pte"] / m["ppl_ours"],
                   "top1": m["top1_agreement"], "max_rel_logit_diff": m["max_rel_logit_diff"], "kl_float_to_ours": kl_float}
        except Exception as exc:  # e.g. export_llama refusing a checkpoint
            row = {"model": label, "case": name, "error": str(exc).splitlines()[0][:200], "kl_float_to_ours": kl_float}
        row["seconds"] = time.perf_counter() - t
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def random_model(tokenizer, hidden: int, heads: int, kv: int, inter: int, layers: int, sharp: float = 1.0, seed: int = 0):
    from tests.helpers import make_tiny_model

    torch.manual_seed(seed)
    m = make_tiny_model(vocab_size=len(tokenizer), hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv,
                        intermediate_size=inter, num_hidden_layers=layers, max_position_embeddings=1024)
    with torch.no_grad():
        for layer in m.model.layers:  # sharper attention: larger q/k logits
            layer.self_attn.q_proj.weight.mul_(sharp)
            layer.self_attn.k_proj.weight.mul_(sharp)
    return untie_embeddings(m)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=4, help="verification windows (spinquant export's default: 4)")
    ap.add_argument("--seqlen", type=int, default=512, help="tokens per window (spinquant export's default: 512)")
    ap.add_argument("--skip-ref", action="store_true")
    ap.add_argument("--render-only", action="store_true", help="re-make the .md from the measured .json")
    args = ap.parse_args()
    if args.render_only:
        render(json.loads((RESULTS / "verification_margins.json").read_text()))
        return
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.helpers import CORPUS, make_tiny_tokenizer

    work = Path(tempfile.mkdtemp(prefix="spinquant-margins-"))
    rows: list[dict] = []
    t0 = time.perf_counter()
    tok = make_tiny_tokenizer()
    corpus = work / "corpus.txt"
    corpus.write_text(CORPUS)
    windows = evaluation_windows(evaluation_ids(tok, str(corpus)), args.seqlen, args.windows)
    configs = [("random-h64-gqa", dict(hidden=64, heads=4, kv=2, inter=128, layers=2)),
               ("random-h128-mha", dict(hidden=128, heads=4, kv=4, inter=256, layers=3, seed=1)),
               ("random-h64-sharp-attn", dict(hidden=64, heads=4, kv=2, inter=128, layers=2, sharp=4.0, seed=2))]
    for label, kw in configs:
        rows += measure(random_model(tok, **kw), windows, label, work)
    if not args.skip_ref:
        ref = SHARED / "models/ref-llama-25m"
        ref_tok = load_tokenizer(ref)
        ids = evaluation_ids(ref_tok, str(SHARED / "data/wikitext-2-raw/wiki.test.raw"))
        rows += measure(load_model(ref), evaluation_windows(ids, args.seqlen, args.windows), "ref-llama-25m", work)
    total = time.perf_counter() - t0
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.node()} ({platform.machine()}, {__import__('os').cpu_count()} cores, torch {torch.__version__})"
    doc = {"machine": machine, "windows": args.windows, "seqlen": args.seqlen, "seconds": total, "rows": rows}
    (RESULTS / "verification_margins.json").write_text(json.dumps(doc, indent=2))
    render(doc)


def render(doc: dict, ratio: float = 0.2) -> None:
    """verification_margins.md from the measured JSON: the table, each case's KL ratio, and what the accept rule
    (KL(ours||pte) <= ratio x KL(float||ours), perplexity within 1%) and the earlier one (top-1 >= 95%,
    perplexity within 1%) decide."""
    rows = doc["rows"]
    lines = ["# .pte verification: right vs deliberately wrong checkpoints", "",
             f"Command: `python scripts/bench_verification_margins.py --windows {doc['windows']} --seqlen {doc['seqlen']}` "
             f"(`--render-only` re-makes this file from the .json)  ",
             f"Machine: {doc['machine']}; {doc['seconds']:.0f} s in all (another job shared the 2 cores for part of it).  ",
             f"Each case: {doc['windows']} x {doc['seqlen']} tokens (WikiText-2 test for the reference model, the test corpus for "
             f"the random ones), our fake-quant model (random Hadamard + RTN with range setting, 8da4w_output_8da8w g32) vs the "
             f".pte that executorch's export_llama made from the checkpoint named in 'case'. ratio = KL(ours‖pte) / "
             f"KL(float‖ours). Verdicts: 'KL rule' = ratio <= {ratio} and perplexity within 1% (spinquant's rule); "
             f"'top-1 rule' = top-1 >= 95% and perplexity within 1% (the rule before).", "",
             "| model | case | KL(ours‖pte) | KL(float‖ours) | ratio | ppl pte/ours | top-1 | KL rule | top-1 rule |",
             "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['case']} | export failed: {r['error']} | | | | | | |")
            continue
        q = r["kl_ours_to_pte"] / r["kl_float_to_ours"]
        ppl_ok = abs(r["ppl_ratio"] - 1) <= 0.01
        kl_rule = "accept" if q <= ratio and ppl_ok else "reject"
        top1_rule = "accept" if r["top1"] >= 0.95 and ppl_ok else "reject"
        lines.append(f"| {r['model']} | {r['case']} | {r['kl_ours_to_pte']:.2e} | {r['kl_float_to_ours']:.2e} | {q:.3f} | "
                     f"{r['ppl_ratio']:.4f} | {100 * r['top1']:.2f}% | {kl_rule} | {top1_rule} |")
    ok = [r for r in rows if "error" not in r]
    right = [r["kl_ours_to_pte"] / r["kl_float_to_ours"] for r in ok if r["case"] == "right"]
    lines += ["", f"Right checkpoints: ratio {min(right):.4f} to {max(right):.4f}."]
    (RESULTS / "verification_margins.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
