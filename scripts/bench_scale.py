#!/usr/bin/env python
"""Llama 3.2 1B / 3B (and Llama 3.1 8B) shapes end to end: time and peak memory of every `spinquant calibrate` stage.

Builds the real shape from a config in code with random weights (bf16 on disk, sharded safetensors with an index
like a user's fine-tune, llama3 RoPE, tied embeddings as Llama 3.2, an output layer of its own at 8B as Llama 3.1;
linears N(0, 0.02), norms near 1) and the shared reference model's tokenizer (its ids are a subset of the 128256
rows), then runs `spinquant calibrate` as a user would, in a subprocess. While it runs, the resident memory of its whole process tree (the exporter
included) is sampled every 0.25 s and attributed to the stage the log says is running; on CUDA the peak
allocated memory per stage comes from the run's stages.json. Writes benchmarks/results/scale_<shape>_<device>.{md,json}
(with --learn-step: ..._learn-step.{md,json}).

    python scripts/bench_scale.py --shape llama-3.2-1b --device cpu --rotations hadamard --gptq-nsamples 16 --seqlen 512 --eval-windows 2
    python scripts/bench_scale.py --shape llama-3.2-1b --device cpu --learn-step --learn-seqlen 2048  # one learning step
    python scripts/bench_scale.py --shape llama-3.2-1b --device cuda --steps 100 --nsamples 800 --seqlen 2048   # the full recipe
    python scripts/bench_scale.py --shape llama-3.2-1b --device cuda --quick           # minutes: 10 steps, 32 GPTQ windows
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from spinquant.preflight import parameter_count  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES = {  # the published Llama 3.2 configs (config.json of meta-llama/Llama-3.2-1B and -3B)
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, head_dim=128),
    # meta-llama/Llama-3.1-8B: the same vocabulary and RoPE, an output layer of its own
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    # a small stand-in with the same vocabulary and RoPE, to check this script in a minute
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64),
}
GIB = 2**30


def build_model(shape: str, out: Path, shard_bytes: int = 2 * GIB, layers: int | None = None) -> dict:
    """Write the shape as a Hugging Face directory, one tensor at a time (memory: one shard); ``layers`` overrides
    the depth (a quick check of the vocabulary- and width-bound stages)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(SHARED / "models" / "ref-llama-25m")
    cfg = LlamaConfig(vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                      rope_scaling=dict(LLAMA3_ROPE), torch_dtype="bfloat16",
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      **{"tie_word_embeddings": True, **SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})})
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    h, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (cfg.vocab_size, h))]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                  (p + "self_attn.q_proj.weight", (cfg.num_attention_heads * hd, h)),
                  (p + "self_attn.k_proj.weight", (cfg.num_key_value_heads * hd, h)),
                  (p + "self_attn.v_proj.weight", (cfg.num_key_value_heads * hd, h)),
                  (p + "self_attn.o_proj.weight", (h, cfg.num_attention_heads * hd)),
                  (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)), (p + "mlp.down_proj.weight", (h, f))]
    names.append(("model.norm.weight", (h,)))
    if not cfg.tie_word_embeddings:
        names.append(("lm_head.weight", (cfg.vocab_size, h)))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, dims in names:
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(dims, generator=gen)
        else:
            t = 0.02 * torch.randn(dims, generator=gen)
        t = t.to(torch.bfloat16)
        nbytes = t.numel() * 2
        if size and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / fname, metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * 2
        shard.clear()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg.save_pretrained(out)
    tok.save_pretrained(out)
    params = sum(int(torch.Size(d).numel()) for _, d in names)
    return {"parameters": params, "bytes_on_disk": total, "shards": len(shards), "config": shape_facts(out)}


def shape_facts(model: Path) -> dict:
    """The config values the learning-memory projection needs."""
    cfg = json.loads((model / "config.json").read_text())
    return {k: cfg.get(k) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "tie_word_embeddings")}


def describe_model(model: Path) -> dict:
    """The same facts as :func:`build_model` for a model directory built earlier (``--work`` reuses it)."""
    index = json.loads((model / "model.safetensors.index.json").read_text())
    total = index["metadata"]["total_size"]
    return {"reused": str(model), "parameters": total // 2, "bytes_on_disk": total, "shards": len(set(index["weight_map"].values())),
            "config": shape_facts(model)}


class TreeMemory:
    """Peak resident memory (GiB) of a process and all its children (``peaks``), and of the process alone
    (``own_peaks``: spinquant's own, without executorch's exporter child), per labelled phase, sampled every 0.25 s."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.phase = "start"
        self.peaks: dict[str, float] = {}
        self.own_peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _rss(self) -> tuple[int, int]:
        """(the tree's, the root's own) resident bytes."""
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0, 0
        sizes = []
        for p in procs:
            try:
                sizes.append(p.memory_info().rss)
            except psutil.NoSuchProcess:
                sizes.append(0)
        return sum(sizes), sizes[0]

    def _run(self) -> None:
        while not self._stop.is_set():
            tree, own = (b / GIB for b in self._rss())
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), tree)
            self.own_peaks[self.phase] = max(self.own_peaks.get(self.phase, 0.0), own)
            time.sleep(0.25)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_monitored(cmd: list[str], log: Path) -> tuple[int, TreeMemory, float]:
    """Run ``cmd``; stage markers in its stderr ("[spinquant] stage NAME") switch the memory phase."""
    # the benchmark measures what the run takes, so it runs past calibrate's memory estimate (which it calibrates)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "SPINQUANT_SKIP_RESOURCE_CHECK": "1"}
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        mem = TreeMemory(proc.pid)
        mem.phase = "preflight"  # checks and model load before the first stage line
        for line in proc.stdout:
            f.write(line)
            f.flush()
            m = re.search(r"\[spinquant\] stage (\w+)", line)
            if m:  # a stage a resumed run skips keeps no peak of its own (its numbers are the earlier run's)
                mem.phase = "skipped stages" if "done, skipped" in line else m.group(1)
            print(line, end="", flush=True)
        code = proc.wait()
        mem.stop()
    return code, mem, time.perf_counter() - t


def machine(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.total_memory / GIB:.0f} GiB), {os.cpu_count()} CPU cores, torch {torch.__version__}"
    return (f"{platform.node()}: {platform.machine()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / GIB:.0f} GiB RAM, "
            f"torch {torch.__version__}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rotations", choices=["learned", "hadamard"], default=None,
                    help="[default: hadamard on cpu, learned on cuda]")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--nsamples", type=int, default=None)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--gptq-nsamples", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=2)
    ap.add_argument("--no-pte", action="store_true")
    ap.add_argument("--quick", action="store_true", help="10 steps x 8 windows, 32 GPTQ windows, seqlen 2048")
    ap.add_argument("--learn-step", action="store_true", help="only one learning step (micro-batch 1 x --learn-seqlen tokens)")
    ap.add_argument("--learn-seqlen", type=int, default=256, help="with --learn-step: tokens of its one window (2048: Meta's)")
    ap.add_argument("--quantize-rtn", action="store_true",
                    help="only `spinquant quantize --method rtn` (load, rotate, quantize, checkpoint, reload check): the "
                         "memory of the whole-model stages at full depth without GPTQ's hours on a CPU")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="one more recipe key for calibrate (repeatable), e.g. tune_scales_steps=2")
    ap.add_argument("--work", default=None, help="working folder (kept) [default: a temp folder, removed]")
    ap.add_argument("--layers", type=int, default=None, help="override the depth (a quick check; results named _<N>L)")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.nsamples, args.gptq_nsamples = 10, 80, 32
    rotations = args.rotations or ("learned" if args.device.startswith("cuda") else "hadamard")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="spinquant-scale-"))
    data = SHARED / "data" / "wikitext-2-raw"
    try:
        model = work / f"{args.shape}{f'-{args.layers}L' if args.layers else ''}-random"
        t = time.perf_counter()
        built = build_model(args.shape, model, layers=args.layers) if not model.exists() else describe_model(model)
        built["seconds"] = time.perf_counter() - t
        print(f"model: {built}", flush=True)
        run = work / f"run-{model.name}" / mode_name(args)
        if args.quantize_rtn:
            cmd = [sys.executable, "-m", "spinquant", "quantize", "--model", str(model), "--out", str(run), "--rotations",
                   "hadamard", "--method", "rtn", "--device", args.device]
        elif args.learn_step:
            cmd = [sys.executable, "-m", "spinquant", "learn-rotations", "--model", str(model), "--out", str(run), "--calib-data",
                   str(data / "wiki.valid.raw"), "--steps", "1", "--batch-size", "1", "--seqlen", str(args.learn_seqlen), "--device", args.device]
        else:
            cmd = [sys.executable, "-m", "spinquant", "calibrate", "--model", str(model), "--out", str(run),
                   "--calib-data", str(data / "wiki.valid.raw"), "--eval-data", str(data / "wiki.test.raw"),
                   "--rotations", rotations, "--steps", str(args.steps), "--set", f"batch_size={args.batch_size}",
                   "--set", f"micro_batch={args.micro_batch}", "--seqlen", str(args.seqlen), "--gptq-nsamples",
                   str(args.gptq_nsamples), "--set", f"eval_windows={args.eval_windows}", "--set", f"device={args.device}"]
            if args.nsamples:
                cmd += ["--set", f"nsamples={args.nsamples}"]
            if args.no_pte:
                cmd.append("--no-pte")
            for item in args.sets:
                cmd += ["--set", item]
        code, mem, wall = run_monitored(cmd, work / "log.txt")
        peaks = mem.peaks
        stages = json.loads((run / "stages.json").read_text()) if (run / "stages.json").is_file() else {}
        report = json.loads((run / "report.json").read_text()) if (run / "report.json").is_file() else {}
        learned = json.loads((run / "losses.json").read_text()) if (run / "losses.json").is_file() else {}
        qc = json.loads((run / "quant_config.json").read_text()) if (run / "quant_config.json").is_file() else {}
        tail = (work / "log.txt").read_text().strip().splitlines()[-3:]
        result = {"shape": args.shape, "device": args.device, "machine": machine(args.device), "model": built,
                  "command": " ".join(sys.argv), "spinquant_command": " ".join(cmd[1:]), "exit": code, "wall_seconds": wall,
                  "stages": {k: {"seconds": v.get("seconds"), "peak_rss_gib": peaks.get(k),
                                 "peak_own_rss_gib": mem.own_peaks.get(k), "peak_cuda_gib": v.get("peak_cuda_gib")}
                             for k, v in stages.items()},
                  "peak_rss_gib": peaks, "peak_own_rss_gib": mem.own_peaks, "sizes": report.get("sizes"), "evaluation": report.get("evaluation"),
                  "verification": (report.get("export") or {}).get("verification"), "learning": learned or None,
                  "quantize_times_s": qc.get("times_s"), "log_tail": tail}
        write_results(result, args)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def fixed_learning_gib(untied: int, vocab_dim: int) -> tuple[float, float, float]:
    """(all, float32 weights, rotated linears + their gradients) in GiB: the learning memory that does not grow with the
    tokens, for a model of ``untied`` parameters (embedding and output layer counted apart) whose embedding has
    ``vocab_dim`` of them; see :func:`learn_projection`."""
    linear = untied - vocab_dim  # every linear incl. lm_head: all but the embedding
    return (untied + 2 * linear) * 4 / GIB, untied * 4 / GIB, 2 * linear * 4 / GIB


def learn_projection(r: dict, seqlen: int) -> str:
    """GPU memory at Meta's batch (8 x 2048, micro-batch 1 x 2048) from the CPU step at 1 x ``seqlen``.

    What does not grow with the tokens: the frozen float32 weights (the model's parameters with the embedding
    untied), and per step one rotated copy of every linear plus its gradient (rotation.py: the rotated weights are
    leaves whose gradients accumulate over the micro-batches), so 3 x the linear weights in all. What grows: the
    activations of one micro-batch (the batch of 8 is accumulated micro-batch by micro-batch, so it adds nothing),
    linear in the tokens with SDPA attention and per-layer checkpointing. The CPU peak minus the fixed part is taken
    as the activations of ``seqlen`` tokens, x 2048 / seqlen: an upper bound (the Python process, tokenizer and
    calibration text are counted as activations; bf16 autocast on a GPU halves most activations). The other shapes:
    their fixed part from their parameter counts, the activations scaled by hidden size x layers (an estimate).
    """
    cfg = r["model"].get("config") or {}
    vocab_dim = cfg.get("vocab_size", 128256) * cfg["hidden_size"]
    untied = r["model"]["parameters"] + (vocab_dim if cfg.get("tie_word_embeddings", True) else 0)
    fixed, weights, rotated = fixed_learning_gib(untied, vocab_dim)
    act = max(max(r["peak_rss_gib"].values()) - fixed, 0.0) * 2048 / seqlen
    lines = [f"Projection to 8 x 2048 (micro-batch 1 x 2048) on a GPU: fixed {fixed:.1f} GiB (float32 weights "
             f"{weights:.1f} GiB + rotated linears and their gradients {rotated:.1f} GiB) + activations {act:.1f} GiB "
             f"(measured at {seqlen} tokens{'' if seqlen == 2048 else f', x {2048 / seqlen:g}'}) = {fixed + act:.1f} GiB "
             f"(an upper bound; see learn_projection in scripts/bench_scale.py for what is counted)."]
    depth = cfg["hidden_size"] * cfg["num_hidden_layers"]
    for shape, c in SHAPES.items():
        if shape == "small" or c["hidden_size"] == cfg["hidden_size"]:
            continue
        f, _, _ = fixed_learning_gib(parameter_count(LlamaConfig(vocab_size=128256, **c)), 128256 * c["hidden_size"])
        a = act * c["hidden_size"] * c["num_hidden_layers"] / depth
        lines.append(f"Estimated from it for {shape}: fixed {f:.1f} GiB + activations {a:.1f} GiB = {f + a:.1f} GiB.")
    return " ".join(lines)


def mode_name(args) -> str:
    return "quantize-rtn" if args.quantize_rtn else "learn-step" if args.learn_step else "calibrate"


def write_results(r: dict, args) -> None:
    mode = mode_name(args)
    name = (f"scale_{args.shape}_{args.device.split(':')[0]}" + (f"_{args.layers}L" if args.layers else "")
            + ("" if mode == "calibrate" else f"_{mode}"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(r, indent=2))
    depth = f" ({args.layers} layers)" if args.layers else ""
    lines = [f"# {args.shape}{depth} on {args.device}: `spinquant {r['spinquant_command'].split()[2]}` per stage", "",
             f"Machine: {r['machine']}. Command: `python scripts/bench_scale.py {' '.join(sys.argv[1:])}` "
             f"(runs `{r['spinquant_command']}`). Exit status {r['exit']}, wall time {r['wall_seconds']:.0f} s "
             f"(model build {r['model'].get('seconds', 0):.0f} s before it: {r['model']}).", "",
             "| stage | seconds | peak RSS, spinquant's process (GiB) | peak RSS with its children: executorch's exporter (GiB) "
             "| peak CUDA allocated (GiB) |", "|---|---:|---:|---:|---:|"]
    for phase in dict.fromkeys([*r["peak_rss_gib"], *r["stages"]]):
        gib, own = r["peak_rss_gib"].get(phase), r.get("peak_own_rss_gib", {}).get(phase)
        st = r["stages"].get(phase, {})
        sec, cuda = st.get("seconds"), st.get("peak_cuda_gib")
        label = ("the whole command: load, rotate, RTN, checkpoint, reload check" if args.quantize_rtn and phase == "preflight"
                 else "checks + model load (+ learning, which prints no start line) before the next stage" if phase == "preflight"
                 else phase if phase in r["stages"] or args.learn_step else f"{phase} (not finished)")
        lines.append(f"| {label} | {'' if sec is None else f'{sec:.0f}'} | {'' if own is None else f'{own:.2f}'} | "
                     f"{'' if gib is None else f'{gib:.2f}'} | {'' if cuda is None else f'{cuda:.2f}'} |")
    if args.quantize_rtn and r.get("quantize_times_s"):
        lines += ["", "Inside it (quant_config.json times_s): " + ", ".join(f"{k} {v:.0f} s" for k, v in r["quantize_times_s"].items())]
    if r.get("sizes"):
        lines += ["", "Sizes (MiB): " + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in r["sizes"].items())]
    ev = r.get("evaluation") or {}
    if ev.get("quantized"):
        lines += ["", f"Evaluation ({ev['windows']} x {ev['seqlen']} tokens; random weights, so only a sanity check): "
                      f"KL {ev['quantized']['kl']:.4f}, top-1 {100 * ev['quantized']['top1']:.1f}%"]
    v = r.get("verification")
    if v:
        lines += ["", f".pte verified: KL(ours||pte) {v['kl_ours_to_pte']:.2e} (bound {v.get('kl_bound', float('nan')):.2e}), "
                      f"top-1 agreement {100 * v['top1_agreement']:.2f}%"]
    if r.get("learning"):
        lines += ["", f"Learning: {json.dumps({k: v for k, v in r['learning'].items() if k in ('steps_per_s', 'tokens_per_s', 'seconds')})}"]
    if args.learn_step and r["exit"] == 0 and "parameters" in r["model"]:
        lines += ["", learn_projection(r, args.learn_seqlen)]
    if r["exit"] != 0:
        lines += ["", "Did not finish; last lines of the log:", "", *[f"    {x}" for x in r["log_tail"]]]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
