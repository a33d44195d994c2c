"""Run reports: report.json (everything measured) and report.md (tables + plots) in the run directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from spinquant.atomic import atomic_file
from spinquant.recipes import RECIPE_TEXT


@torch.no_grad()
def residual_stats(inputs: list[torch.Tensor], r1: torch.Tensor | None = None) -> list[dict[str, float]]:
    """Per decoder layer, from its residual-stream inputs ``inputs[i]`` (tokens, dim) (the float model's:
    spinquant.streaming.FloatReference.residuals), rotated by ``r1`` (dim, dim) when given (the rotated model's
    residual stream is ``h @ R1``; norm fusion, R2, R4 and channel scales act inside the layers): the largest |x|, the
    ratio of the largest to the median per-channel max |x| (outlier channels), and the kurtosis (outlier mass)."""
    stats = []
    for i, x in enumerate(inputs):
        if r1 is not None:
            x = (x.double() @ r1.double()).float()
        chan = x.abs().amax(0)
        flat = x.reshape(-1)
        z = (flat - flat.mean()) / flat.std()
        stats.append({"layer": i, "absmax": x.abs().max().item(), "max_over_median_channel": (chan.max() / chan.median()).item(),
                      "kurtosis": z.pow(4).mean().item()})
    return stats


def plot_residual_stats(before: list[dict], after: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), dpi=120)
    for ax, key, label in ((axes[0], "kurtosis", "kurtosis of layer input"), (axes[1], "max_over_median_channel", "max / median channel max|x|")):
        ax.plot([s["layer"] for s in before], [s[key] for s in before], "o-", label="original")
        ax.plot([s["layer"] for s in after], [s[key] for s in after], "s-", label="rotated")
        ax.set_xlabel("decoder layer")
        ax.set_title(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(v: Any, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _rotations_line(o: dict[str, Any]) -> str:
    """One sentence on how the rotations were made, from the run's options."""

    r4 = "; R4 online before down_proj" if o.get("r4", "on") == "on" else "; no R4"
    tuned = (f" After GPTQ the scales were tuned end to end on KL to the float model ({o['tune_scales_steps']} windows x "
             f"{o.get('seqlen')} tokens, lr {o.get('tune_scales_lr')})." if o.get("tune_scales_steps") else "")
    if o.get("rotations") == "hadamard" or not o.get("learned", True):
        how = "learned rotations copied from another run" if o.get("rotations") == "learned" else f"random Hadamard (seed {o.get('seed')}), no learning"
        return f"Rotations: {how}{r4}.{tuned}"
    recipe = f" Recipe **{o['recipe']}** ({RECIPE_TEXT[o['recipe']]})." if o.get("recipe") in RECIPE_TEXT else ""
    cap = f" (steps capped at {o['max_angle']} rad)" if o.get("max_angle") is not None else ""
    gptq = ("GPTQ" + (f" with the float model as target (fit damped {o.get('gptq_objective_damp', 0.01)})"
                      if o.get("gptq_objective") == "float" else "")
            + (", group scales refitted by least squares," if o.get("gptq_refit_scales") else ""))
    return (f"Rotations: R1/R2 learned from the random Hadamard of seed {o.get('seed')}, W16A8KV16, "
            f"ce loss, lr {o.get('lr')}{cap}, {o.get('steps')} steps x {o.get('batch_size')} x "
            f"{o.get('seqlen')} tokens; {gptq} on {o.get('gptq_nsamples')} x {o.get('seqlen')}{r4}.{tuned}{recipe}")


def render_markdown(r: dict[str, Any]) -> str:
    lines = [f"# spinquant report: {r['model']}", "", f"Target **{r['target']}** ({r.get('target_description', '')}).", ""]
    if r.get("options"):
        lines += [_rotations_line(r["options"]), ""]
    for ev in r.get("evaluations") or ([r["evaluation"]] if r.get("evaluation") else []):  # one section per text
        if ev.get("skipped"):
            lines += [f"Evaluation on {ev.get('data', 'the text')} skipped: {ev['skipped']}", ""]
            continue
        lines += [f"## Quality (WikiText-2 test protocol on {ev['data']}, {ev['windows']} windows x {ev['seqlen']} tokens)", "",
                  "| model | perplexity | KL to float (nats/token) | top-1 agreement with float |", "|---|---:|---:|---:|",
                  f"| float | {ev['float']['ppl']:.3f} | 0 | 100% |"]
        for key, label in (("random_hadamard", "random Hadamard + same quantization"), ("quantized", "this run (fake-quant)")):
            if ev.get(key):
                lines.append(f"| {label} | {ev[key]['ppl']:.3f} | {_fmt(ev[key]['kl'], '.4f')} | {_fmt(100 * ev[key]['top1'], '.2f')}% |")
        lines.append("")
    v = (r.get("export") or {}).get("verification")
    if v:
        lines += ["## .pte verification (executorch runtime vs our fake-quant model)", "",
                  f"{v['windows']} windows x {v['seqlen']} tokens of {v['data']}: perplexity {v['ppl_pte']:.3f} (.pte) vs "
                  f"{v['ppl_ours']:.3f} (ours), top-1 agreement {100 * v['top1_agreement']:.2f}%, max relative logit "
                  f"difference {v['max_rel_logit_diff']:.2e}.", ""]
    if r.get("sizes"):
        lines += ["## Sizes", "", "| file | MiB |", "|---|---:|"] + [f"| {k} | {b / 2**20:.2f} |" for k, b in r["sizes"].items()] + [""]
    if r.get("stage_seconds"):
        lines += ["## Time per stage", "", "| stage | seconds |", "|---|---:|"] + [f"| {k} | {s:.1f} |" for k, s in r["stage_seconds"].items()] + [""]
    plots = [(p, t) for p, t in (("learning_curve.png", "Rotation learning curve"), ("residual_stats.png", "Residual-stream outliers before and after rotation")) if p in r.get("plots", [])]
    for p, t in plots:
        lines += [f"## {t}", "", f"![{t}]({p})", ""]
    return "\n".join(lines)


def write_report(run: Path, report: dict[str, Any]) -> None:
    with atomic_file(run / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    with atomic_file(run / "report.md") as tmp:
        tmp.write_text(render_markdown(report))
