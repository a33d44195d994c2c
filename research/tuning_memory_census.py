"""Where does the scale tuning's memory go? The 1B shape read layer by layer, RTN, then 2 tuning steps, with RSS
(anon/file) and a census of live CPU tensors (gc) after each phase. `python research/tuning_memory_census.py MODEL_DIR`;
run with MALLOC_MMAP_THRESHOLD_=4194304 to see glibc's dynamic mmap threshold at work (RESULTS table 15)."""
import gc, sys, torch
from spinquant.formats.streamed import LayeredCheckpoint
from spinquant.streaming import StreamedModel, FloatReference
from spinquant.fusion import Rotations
from spinquant.quant.apply import quantize_model, WeightQuantConfig
from spinquant.quant.scheme import META_8DA4W
from spinquant.quant.scale_tuning import ScaleTuningConfig, tune_scales
from spinquant.memory import release_memory
src = sys.argv[1]
def rss():
    d = dict(l.split(":", 1) for l in open("/proc/self/status") if l.startswith("Rss"))
    return " ".join(f"{k}={int(v.split()[0]) / 2**20:.2f}" for k, v in d.items())
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
import time
T0 = time.perf_counter()
def show(tag):
    print(f"{tag:28s} {rss()}  live tensors {census():.2f} GiB  t={time.perf_counter() - T0:.0f}s", flush=True)
ck = LayeredCheckpoint.open(src); model = ck.skeleton()
prep = StreamedModel(ck, model, Rotations.random_hadamard(model, 0, r4=True), torch.device("cpu"))
quantize_model(model, META_8DA4W, WeightQuantConfig(method="rtn", clip_search=False), prepare=prep, progress=False)
del prep; release_memory(); show("after RTN")
torch.manual_seed(0)
windows = torch.randint(0, 128000, (2, 512))
teacher = FloatReference.build(src, windows); show("after teacher")
tune_scales(model, teacher, windows, ScaleTuningConfig(steps=2, lr=1e-4), progress=False); show("after tuning")
del teacher; release_memory(); show("after release")
