"""Where does the scale tuning's memory go? A model read layer by layer, RTN, the float reference, then STEPS tuning
steps of 512 tokens, with the resident set (now and its peak since the phase before, VmHWM) and, with CENSUS=1, a
census of live CPU tensors (gc) after each phase.

    python research/tuning_memory_census.py /tmp/scale/llama-3.2-1b-random [STEPS=4]
    NO_TRIM=1 python research/tuning_memory_census.py ...   # the library's heap trimming off (its state before)

RESULTS tables 15 and 16. Run with MALLOC_MMAP_THRESHOLD_=4194304 to see glibc's dynamic mmap threshold at work."""
import gc, os, sys, time, torch
from spinquant import memory
from spinquant.formats.streamed import LayeredCheckpoint
from spinquant.streaming import StreamedModel, FloatReference
from spinquant.fusion import Rotations
from spinquant.quant.apply import quantize_model, WeightQuantConfig
from spinquant.quant.scheme import META_8DA4W
from spinquant.quant.scale_tuning import ScaleTuningConfig, tune_scales
from spinquant.memory import release_memory
src, steps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4
if os.environ.get("NO_TRIM") == "1":
    memory.TRIM_FROM_BYTES = 1 << 62
def status():
    return {l.split(":")[0]: int(l.split()[1]) / 2**20 for l in open("/proc/self/status") if l.startswith(("VmHWM", "VmRSS"))}
def census():
    seen, total = set(), 0
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor) and o.device.type == "cpu":
                st = o.untyped_storage()
                if st.data_ptr() not in seen:
                    seen.add(st.data_ptr()); total += st.nbytes()
        except Exception:
            pass
    return total / 2**30
T0 = time.perf_counter()
def show(tag):
    s = status()
    live = f"  live tensors {census():.2f} GiB" if os.environ.get("CENSUS") == "1" else ""
    print(f"{tag:14s} rss {s['VmRSS']:.2f} peak {s['VmHWM']:.2f} GiB{live}  t={time.perf_counter() - T0:.0f}s", flush=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM: the next line's peak is its phase's
ck = LayeredCheckpoint.open(src); model = ck.skeleton()
prep = StreamedModel(ck, model, Rotations.random_hadamard(model, 0, r4=True), torch.device("cpu"))
quantize_model(model, META_8DA4W, WeightQuantConfig(method="rtn", clip_search=False), prepare=prep, progress=False)
del prep; release_memory(); show("after RTN")
torch.manual_seed(0)
windows = torch.randint(0, 128000, (steps, 512))
teacher = FloatReference.build(src, windows); release_memory(); show("after teacher")
cfg = ScaleTuningConfig(steps=steps, lr=1e-4)
tune_scales(model, teacher, windows, cfg, progress=False); show("after tuning")
print("tuning s", round(cfg.stats["seconds"], 1), "losses", [round(x, 5) for x in cfg.stats["losses"]])
