#!/usr/bin/env python
"""The reference model through quantize -> export -> executorch's export_llama -> .pte -> runtime.

Measures: .pte perplexity on WikiText-2 test (>= 20 windows of 1024 tokens) against our fake-quant
model's on the same windows; the .pte's size against an unquantized fp32 .pte of the same model;
decode tokens/s of both through executorch's runtime on this machine's CPU (XNNPACK).
Writes benchmarks/results/export_ref.{md,json}.

    python scripts/bench_export.py --windows 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from spinquant.data import CalibrationSet
from spinquant.evaluate import evaluate, evaluation_ids, evaluation_windows, hf_logits_fn
from spinquant.formats import load_model, load_tokenizer
from spinquant.formats.meta import save_meta
from spinquant.pipeline import export_run, quantize_to_run
from spinquant.pte import PteModel
from spinquant.quant.apply import WeightQuantConfig
from spinquant.quant.scheme import META_8DA4W
from _common import SHARED, result_path


def decode_tokens_per_s(pte: PteModel, n: int = 128) -> float:
    ids = torch.randint(0, pte.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    pte._call(ids[:, :1], 0)  # warm-up
    t = time.perf_counter()
    for i in range(n):
        pte._call(ids[:, i : i + 1], i)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHARED / "models/ref-llama-25m"))
    ap.add_argument("--test-data", default=str(SHARED / "data/wikitext-2-raw/wiki.test.raw"))
    ap.add_argument("--calib-data", default=str(SHARED / "data/wikitext-2-raw/wiki.valid.raw"))
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--gptq-nsamples", type=int, default=32)
    ap.add_argument("--rotations", default="hadamard", help="none | hadamard | an R.bin (e.g. learned)")
    ap.add_argument("--work", default=None, help="working directory (default: a temp dir)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="spinquant-bench-export-"))
    run = work / "run"
    timings = {}

    t = time.perf_counter()
    quantize_to_run(args.model, str(run), META_8DA4W, WeightQuantConfig(method="gptq"), rotations=args.rotations,
                    calib=CalibrationSet(source=args.calib_data, nsamples=args.gptq_nsamples, seqlen=args.seqlen), progress=False)
    timings["quantize_s"] = time.perf_counter() - t
    t = time.perf_counter()
    exp = export_run(str(run), pte=True, verify_data=args.test_data, verify_windows=2, verify_seqlen=512,
                     max_seq_len=args.seqlen + 1, full_logits=True)
    timings["export_and_verify_s"] = time.perf_counter() - t

    tok = load_tokenizer(args.model)
    windows = evaluation_windows(evaluation_ids(tok, args.test_data), args.seqlen, args.windows)
    float_model = load_model(args.model)
    ref = hf_logits_fn(float_model)
    pte = PteModel(run / "model.pte")
    ours = evaluate(hf_logits_fn(load_model(run)), windows, ref, progress=False)
    t = time.perf_counter()
    through_pte = evaluate(pte, windows, ref, progress=False)
    timings["pte_eval_s"] = time.perf_counter() - t

    # unquantized fp32 .pte of the same model, same export flags minus the pre-quantization ones
    fp = work / "fp32"
    save_meta(float_model, fp)
    cmd = [sys.executable, "-m", "executorch.examples.models.llama.export_llama", "--model", "llama3_2", "--checkpoint",
           str(fp / "consolidated.00.pth"), "--params", str(fp / "params.json"), "-d", "fp32", "-X", "-kv", "--use_sdpa_with_kv_cache",
           "--max_seq_length", str(args.seqlen + 1), "--max_context_length", str(args.seqlen + 1), "--generate_full_logits",
           "--output_name", str(fp / "model_fp32.pte")]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=fp)
    timings["export_fp32_s"] = time.perf_counter() - t
    fp32 = PteModel(fp / "model_fp32.pte")
    rows = {
        "fake_quant": ours.to_dict(), "pte": through_pte.to_dict(),
        "pte_vs_fake_quant_ppl_rel": through_pte.ppl / ours.ppl - 1,
        "pte_bytes": (run / "model.pte").stat().st_size, "fp32_pte_bytes": (fp / "model_fp32.pte").stat().st_size,
        "decode_tokens_per_s": decode_tokens_per_s(pte), "fp32_decode_tokens_per_s": decode_tokens_per_s(fp32),
        "verification": exp["verification"], "timings": timings,
    }
    machine = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, executorch XNNPACK"
    command = "python " + " ".join(sys.argv)
    out = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "export_ref"
    out.parent.mkdir(parents=True, exist_ok=True)
    result_path(out, ".json").write_text(json.dumps({"command": command, "machine": machine, "args": vars(args), **rows}, indent=2))
    r = rows
    lines = [f"Command: `{command}`  ", f"Machine: {machine}  ",
             f"Model: {Path(args.model).name}, rotations {args.rotations}, GPTQ+clip ({args.gptq_nsamples} x {args.seqlen} calibration tokens), "
             f"8da4w_output_8da8w group 32. Evaluation: first {windows.shape[0]} windows of {args.seqlen} tokens of WikiText-2 test.", "",
             "| | perplexity | KL to float | top-1 vs float | file size (MiB) | decode tokens/s |", "|---|---:|---:|---:|---:|---:|",
             f"| fake-quant (ours) | {ours.ppl:.3f} | {ours.kl:.4f} | {100 * ours.top1:.2f}% | – | – |",
             f"| .pte (executorch runtime) | {through_pte.ppl:.3f} | {through_pte.kl:.4f} | {100 * through_pte.top1:.2f}% | "
             f"{r['pte_bytes'] / 2**20:.1f} | {r['decode_tokens_per_s']:.0f} |",
             f"| fp32 .pte (unquantized) | – | – | – | {r['fp32_pte_bytes'] / 2**20:.1f} | {r['fp32_decode_tokens_per_s']:.0f} |", "",
             f".pte vs fake-quant perplexity: {100 * r['pte_vs_fake_quant_ppl_rel']:+.3f}%. Size ratio fp32/quantized: "
             f"{r['fp32_pte_bytes'] / r['pte_bytes']:.2f}x. Decode speed ratio quantized/fp32: "
             f"{r['decode_tokens_per_s'] / r['fp32_decode_tokens_per_s']:.2f}x. Times (s): "
             + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())]
    result_path(out, ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
