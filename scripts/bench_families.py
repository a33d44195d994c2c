"""Every supported non-Llama family end to end on a tiny random model: rotation exactness and the .pte's agreement.

    .venv/bin/python scripts/bench_families.py --out benchmarks/results/families

For each family (tests/helpers.FAMILY_SHAPES: the real head_dim, GQA ratio, biases, norms, partial rotary and LongRoPE
of Qwen2.5, Qwen3, Phi-4-mini), in a temp folder: `spinquant rotate --no-r4` and `--r4 on` (max relative logit
difference against transformers' own class), then `spinquant calibrate --rotations hadamard` with the default recipe
at tiny budgets, whose verification.json (KL(ours || .pte) against its bound, top-1, perplexities) is recorded. There
are no real weights of these families on the machine: these numbers check the plumbing, not quality.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import result_path  # noqa: E402
from spinquant.cli import cli  # noqa: E402
from spinquant.formats import load_model  # noqa: E402
from tests.helpers import CORPUS, FAMILY_SHAPES, make_tiny_family_model, make_tiny_tokenizer  # noqa: E402


def _run(*args) -> None:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    if r.exit_code != 0:
        raise SystemExit(f"spinquant {' '.join(map(str, args))} failed: {r.output}")


def bench(family: str, root: Path) -> dict:
    src = root / family
    make_tiny_family_model(family).save_pretrained(src)
    make_tiny_tokenizer().save_pretrained(src)
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS)
    original = load_model(src)
    ids = torch.randint(0, original.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    row = {"family": family, "model_class": type(original).__name__}
    with torch.no_grad():
        ref = original(ids).logits
        for flag in (["--no-r4"], ["--r4", "on"]):
            out = root / f"{family}-rot{flag[-1]}"
            _run("rotate", "--model", src, "--out", out, *flag)
            diff = ((load_model(out)(ids).logits - ref).abs().max() / ref.abs().max()).item()
            row[f"rotate_{'r4_off' if flag == ['--no-r4'] else 'r4_on'}_max_rel_diff"] = diff
    t = time.perf_counter()
    run = root / f"{family}-run"
    _run("calibrate", "--model", src, "--out", run, "--calib-data", corpus, "--eval-data", corpus, "--rotations", "hadamard",
         "--seqlen", "64", "--gptq-nsamples", "8", "--set", "eval_windows=4")
    row["calibrate_seconds"] = time.perf_counter() - t
    ver = json.loads((run / "verification.json").read_text())
    row.update(verified=ver["verified"], spin_quant=ver["spin_quant"], **{k: ver["verification"][k] for k in (
        "kl_ours_to_pte", "kl_bound", "kl_float_to_ours", "top1_agreement", "ppl_ours", "ppl_pte", "max_rel_logit_diff")})
    row["export_command"] = ver["export"]["command"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/families"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench(family, Path(tmp)) for family in sorted(FAMILY_SHAPES)]
    meta = {"command": "python " + " ".join(sys.argv), "machine": f"{platform.node()} {torch.get_num_threads()} threads",
            "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result_path(args.out, ".json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    lines = [f"# Families end to end (tiny random models)\n\n`{meta['command']}` on {meta['machine']}, torch {meta['torch']}.\n",
             "| family | class | rotate R4 off | rotate R4 on | KL(ours‖pte) | bound | KL(float‖ours) | top-1 | PPL ours / pte | verified |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['model_class']} | {r['rotate_r4_off_max_rel_diff']:.1e} | "
                     f"{r['rotate_r4_on_max_rel_diff']:.1e} | {r['kl_ours_to_pte']:.2e} | {r['kl_bound']:.2e} | "
                     f"{r['kl_float_to_ours']:.2e} | {100 * r['top1_agreement']:.2f}% | {r['ppl_ours']:.2f} / {r['ppl_pte']:.2f} | "
                     f"{r['verified']} |")
    result_path(args.out, ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
