#!/usr/bin/env python
"""Exploration behind quant/scale_tuning.py (kept as it was run, for the record of benchmarks/results/scale_tuning.md).

Quantizes SmolLM2 8da4w once (Hadamard R1/R2 without R4, float-target GPTQ + scale refit on --nsamples x 1024 tokens of
wiki.valid.raw) into --cache, then trains the scales end to end on KL to the float model with a hand-written loop
(Adam or SGD on log-scale offsets, cosine decay; a 4-window probe of the training text every --probe-every steps) or,
with --prod, with spinquant's tune_scales, and evaluates on the first --windows x 1024 tokens of wiki.test.raw.

    python scripts/explore_scale_tuning.py --model SMOLLM2 --cache /tmp/q_seed0.pt --steps 128 --lr 1e-4 \
        --train-nsamples 128 --train-seed 1 --probe-every 32 --eval-every 64 --out r3.json
"""
import argparse, copy, json, time, sys
from pathlib import Path
import torch, torch.nn.functional as F
from _common import SHARED
from spinquant.data import CalibrationSet, calibration_windows
from spinquant.evaluate import cached_logits_fn, evaluate, evaluation_ids, evaluation_windows, hf_logits_fn
from spinquant.fusion import Rotations, fuse_and_rotate
from spinquant.models import load_model, load_tokenizer, untie_embeddings
from spinquant.quant.apply import WeightQuantConfig, quantize_model
from spinquant.quant.fake_quant import make_fake_quant, quant_linears, set_embedding_quantized
from spinquant.quant.scheme import META_8DA4W

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True, help="SmolLM2-135M directory (../shared/tools/make_smollm2.py)")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--nsamples", type=int, default=32)
ap.add_argument("--train-nsamples", type=int, default=32)
ap.add_argument("--train-seed", type=int, default=0)
ap.add_argument("--seqlen", type=int, default=1024)
ap.add_argument("--train-seqlen", type=int, default=1024)
ap.add_argument("--steps", type=int, default=64)
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--windows", type=int, default=16)
ap.add_argument("--probe-every", type=int, default=8)
ap.add_argument("--opt", default="adam")
ap.add_argument("--prod", action="store_true")
ap.add_argument("--tune-norms", action="store_true", help="with --prod: ScaleTuningConfig.norms (the RMSNorm weights too)")
ap.add_argument("--no-head", action="store_true")
ap.add_argument("--eval-every", type=int, default=0)
ap.add_argument("--cache", required=True, help="the quantized model is kept here between runs")
ap.add_argument("--out", required=True)
args = ap.parse_args()
torch.manual_seed(0)
tok = load_tokenizer(args.model)
base = load_model(args.model).float()
base.requires_grad_(False)
test = evaluation_windows(evaluation_ids(tok, str(SHARED / "data/wikitext-2-raw/wiki.test.raw")), 1024, args.windows)
reference = cached_logits_fn(hf_logits_fn(base))
rotated = untie_embeddings(copy.deepcopy(base))
fuse_and_rotate(rotated, Rotations.random_hadamard(rotated, args.seed, r4=False))
model = rotated
if Path(args.cache).is_file():
    st = torch.load(args.cache, weights_only=True)
    make_fake_quant(model, META_8DA4W)
    model.requires_grad_(False)
    for name, lin in quant_linears(model):
        lin.set_quantized(st[name + ".q"], st[name + ".s"])
    set_embedding_quantized(model, st["emb.q"], st["emb.s"])
else:
    calib = calibration_windows(CalibrationSet(source=str(SHARED / "data/wikitext-2-raw/wiki.valid.raw"), nsamples=args.nsamples,
                                               seqlen=args.seqlen, seed=args.seed), tok)
    wq = WeightQuantConfig(method="gptq", float_target=True, scale_refit=True)
    t = time.time(); quantize_model(model, META_8DA4W, wq, calib, progress=True); print("gptq", time.time() - t, flush=True)
    st = {}
    for name, lin in quant_linears(model):
        st[name + ".q"], st[name + ".s"] = lin.qweight, lin.scales
    st["emb.q"], st["emb.s"] = model.model.embed_tokens.qweight, model.model.embed_tokens.scales
    torch.save(st, args.cache)

def ev(m):
    r = evaluate(hf_logits_fn(m), test, reference, progress=False)
    return {"kl": r.kl, "ppl": r.ppl, "top1": r.top1}

res = {"args": vars(args)}
if args.steps == 0 or not Path(args.cache + ".base.json").is_file():
    t = time.time(); res["before"] = ev(model); print("before", res["before"], time.time() - t, flush=True)
    Path(args.cache + ".base.json").write_text(json.dumps(res["before"]))
else:
    res["before"] = json.loads(Path(args.cache + ".base.json").read_text())
train = calibration_windows(CalibrationSet(source=str(SHARED / "data/wikitext-2-raw/wiki.valid.raw"), nsamples=args.train_nsamples,
                                           seqlen=args.train_seqlen, seed=args.train_seed), tok)
if args.prod:
    from spinquant.quant.scale_tuning import ScaleTuningConfig, tune_scales
    cfg = ScaleTuningConfig(steps=args.steps, lr=args.lr, norms=args.tune_norms)
    tune_scales(model, base, train, cfg)
    res["stats"] = {k: v for k, v in cfg.stats.items()}
    res["after"] = ev(model)
    print("after", res["after"], cfg.stats["relative_change"], cfg.stats.get("norm_relative_change"), cfg.stats["seconds"], flush=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    sys.exit(0)
lins = [(n, l) for n, l in quant_linears(model) if not (args.no_head and n == "lm_head")]
s0 = {n: l.scales.detach().clone() for n, l in lins}
theta = {n: torch.zeros_like(s0[n], requires_grad=True) for n, _ in lins}
opt = torch.optim.Adam(theta.values(), lr=args.lr) if args.opt == "adam" else torch.optim.SGD(theta.values(), lr=args.lr, momentum=0.9)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
# teacher hidden states cached per window
t_hidden = {}
losses = []
def probe():
    with torch.no_grad():
        for n, l in lins:
            l.scales = (s0[n] * theta[n].exp()).detach()
        tot = 0.0
        for i in range(min(4, len(train))):
            ids = train[i:i+1]
            tl = F.log_softmax(base(ids).logits[:, :-1].float(), -1)
            lp = F.log_softmax(model(ids).logits[:, :-1].float(), -1)
            tot += (tl.exp() * (tl - lp)).sum(-1).mean().item()
        return tot / min(4, len(train))
print("probe 0", probe(), flush=True)
t0 = time.time()
for step in range(args.steps):
    idx = [(step * args.batch + j) % len(train) for j in range(args.batch)]
    ids = train[idx]
    key = tuple(idx)
    with torch.no_grad():
        th = base.model(ids).last_hidden_state[:, :-1]
        tl = F.log_softmax(base.lm_head(th).float(), -1)
    for n, l in lins:
        l.scales = s0[n] * theta[n].exp()
    h = model.model(ids).last_hidden_state[:, :-1]
    logp = F.log_softmax(model.lm_head(h).float(), -1)
    loss = (tl.exp() * (tl - logp)).sum(-1).mean()
    opt.zero_grad()
    loss.backward()
    opt.step(); sched.step()
    losses.append(loss.item())
    print(f"step {step} loss {loss.item():.5f} {time.time()-t0:.0f}s", flush=True)
    if args.probe_every and (step + 1) % args.probe_every == 0:
        print("probe", step + 1, probe(), flush=True)
    if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
        with torch.no_grad():
            for n, l in lins:
                l.scales = (s0[n] * theta[n].exp()).detach()
        print("eval", step + 1, ev(model), flush=True)
with torch.no_grad():
    for n, l in lins:
        l.scales = (s0[n] * theta[n].exp()).detach()
res["train_seconds"] = time.time() - t0
res["losses"] = losses
res["after"] = ev(model)
d = torch.cat([theta[n].detach().flatten() for n, _ in lins])
res["theta"] = {"mean": d.mean().item(), "std": d.std().item(), "absmax": d.abs().max().item()}
print("after", res["after"], res["theta"], flush=True)
Path(args.out).write_text(json.dumps(res, indent=1))
