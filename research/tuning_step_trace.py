"""Where in a scale-tuning step the resident set grows: RTN on the 1B shape read layer by layer, the float reference,
then 3 tuning steps with a sampler thread keeping the highest RSS per label (step, forward/backward, decoder layer:
set by pre-hooks on each layer's MLP, which also fire in the checkpointed recompute) and, in step 1, a census of
live tensors every 4 layers. `python research/tuning_step_trace.py /tmp/scale/llama-3.2-1b-random` (RESULTS
table 16: live tensors stay at 3.0 GiB while the RSS climbs layer by layer). Trims after each step, as the library
did not before table 16; the library's own trims now run inside as well (set spinquant.memory.TRIM_FROM_BYTES
higher to see the step without them)."""
import sys, threading, time, torch, psutil
from spinquant.formats.streamed import LayeredCheckpoint
from spinquant.streaming import StreamedModel, FloatReference
from spinquant.fusion import Rotations
from spinquant.quant.apply import quantize_model, WeightQuantConfig
from spinquant.quant.scheme import META_8DA4W
from spinquant.quant import scale_tuning
from spinquant.quant.scale_tuning import ScaleTuningConfig, tune_scales
from spinquant.memory import release_memory
from spinquant.architectures import architecture_of
src = sys.argv[1]
P = psutil.Process(); label = ["setup"]; peaks = {}
def sample():
    while True:
        r = P.memory_info().rss / 2**30; peaks[label[0]] = max(peaks.get(label[0], 0), r); time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
ck = LayeredCheckpoint.open(src); model = ck.skeleton()
prep = StreamedModel(ck, model, Rotations.random_hadamard(model, 0, r4=True), torch.device("cpu"))
quantize_model(model, META_8DA4W, WeightQuantConfig(method="rtn", clip_search=False), prepare=prep, progress=False)
del prep; release_memory()
windows = torch.randint(0, 128000, (3, 512), generator=torch.Generator().manual_seed(0))
teacher = FloatReference.build(src, windows); release_memory()
arch = architecture_of(model.config)
import gc
def live(i):
    if step[0] != 1 or i % 4: return
    seen, tot = set(), 0
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor):
                st = o.untyped_storage()
                if st.data_ptr() not in seen: seen.add(st.data_ptr()); tot += st.nbytes()
        except Exception: pass
    print(f"live s1 {phase[0]} layer{i}: {tot/2**30:.2f} GiB rss {P.memory_info().rss/2**30:.2f}", flush=True)
phase = ["fwd"]; step = [0]
for i, layer in enumerate(arch.decoder_layers(model)):
    layer.mlp.register_forward_pre_hook(lambda m, a, i=i: (label.__setitem__(0, f"s{step[0]} {phase[0]} layer{i:02d}"), live(i)) and None)
model.get_submodule(arch.head).register_forward_pre_hook(lambda m, a: label.__setitem__(0, f"s{step[0]} {phase[0]} head"))
def descend(opt, sched, loss):
    phase[0] = "bwd"; label[0] = f"s{step[0]} bwd start"
    opt.zero_grad(set_to_none=True); loss.backward()
    label[0] = f"s{step[0]} opt"; opt.step(); sched.step(); v = loss.item()
    label[0] = f"s{step[0]} trim"; release_memory(); step[0] += 1; phase[0] = "fwd"; label[0] = f"s{step[0]} start"
    return v
scale_tuning.descend = descend
label[0] = "s0 start"
tune_scales(model, teacher, windows, ScaleTuningConfig(steps=3, lr=1e-4), progress=False)
for k, v in peaks.items():
    print(f"{v:6.2f}  {k}")
