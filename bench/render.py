"""Render cost: dawn's renderer against the same networks run the reference's way (same weights, same noise).

    python bench/render.py                                   # hdtf128, 200 frames, 20 DDIM steps
    python bench/render.py --sampler ddim dpm-solver++       # each sampler's steps and time
    python bench/render.py --lengths 200 400 800 1600 --steps 2 --skip-baseline   # length scaling
    python bench/render.py --audio-seconds 8 32 128 --presets tiny hdtf128 --steps 2  # time/memory vs audio length
    python bench/render.py --long-audio-minutes 10 --steps 1 # a 10-minute render: does it fit in 24 GiB?
    python bench/render.py --profile                         # top ops of one U-Net step of each variant

The two variants, each run in its own subprocess so that its peak memory is its own:
- ours: `RenderPipeline.sample_flows` (U-Net `prepare`d once per render, then `forward_prepared` per step,
  local temporal attention) and `RenderPipeline.decode_frames` (source encoded once, frames in batches);
- reference way: the same A2VFDM's weights run by `reference_unet.reference_forward` at every step: the
  U-Net forward as ARCHITECTURE.md §4.1-4.5 describes the official code computing it (contiguous
  (B, C, T, H, W) activations and conv3d, the 275-channel input convolution, condition MLPs and generic
  2-key cross-attentions recomputed per call, plain channel norms, temporal attention over all positions
  at once with explicit T x T logits + relative bias + window mask), then every frame decoded alone with
  the source encoded again for it, as the official code does. It is written from the description (we do
  not have the official code) and shares none of dawn's model kernels; only the LFG decoder and the DDIM
  sampler are dawn's in both variants.
Random weights of the preset (seeded; cost does not depend on them), a synthetic portrait/condition, the
noise the pipeline draws from `--seed`. Peak memory = peak RSS (VmHWM, reset once weights and inputs are
loaded) minus the RSS at that point; on CUDA, max_memory_allocated minus the memory allocated at that point.
"Live tensors" = the peak of the bytes of live tensors of the same render replayed on the meta device
(`predict_peak`: no memory, no compute), which also names the tensors alive at the peak; variants predicted
not to fit in the available memory are not run. U-Net GFLOP/s = FlopCounterMode FLOPs of one forward x
steps / sampling time, next to a 2048^2 matmul on the same threads in the same process.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dawn.pipeline import DTYPES, Motion, Portrait, RenderOptions, RenderPipeline, decode_batch_size
from dawn.models.diffusion import ddim_sample, ddim_timesteps, dpm_solver_sample
from dawn.models import native
from reference_unet import reference_forward  # bench/reference_unet.py (scripts here import by name)

GIB = 2**30
VARIANTS = ("ours", "reference way")


# --- the two ways of rendering ------------------------------------------------------------------------

def build_models(preset: str, seed: int, device: str = "cpu"):
    """(LFG, A2VFDM) of a preset with the random weights of `seed` (both variants run these weights)."""
    from dawn.config import build_models as build_preset

    models = build_preset(preset, seed)
    return models["lfg"].to(device).eval(), models["a2v"].to(device).eval()


def make_inputs(image_size: int, frames: int, seed: int = 0) -> tuple[Portrait, np.ndarray, Motion]:
    """A real portrait (skimage's astronaut, resized), random HuBERT features (T, 1024) and a smooth random
    pose/blink sequence: what the sampling and decoding stages consume."""
    import cv2
    from skimage import data

    rng = np.random.default_rng(seed)
    s = image_size
    image = cv2.resize(data.astronaut()[20:320, 120:420], (s, s), interpolation=cv2.INTER_AREA)
    source_pose = np.array([0, 0, 0, 1, 0, 0], np.float32)
    portrait = Portrait(image=image, pose=source_pose, eyes=np.array([0.3, 0.3], np.float32),
                        face_box=np.array([0.25 * s, 0.75 * s, 0.15 * s, 0.8 * s, s, s], np.float32))
    walk = np.cumsum(rng.normal(0, 0.05, (frames, 6)), axis=0).astype(np.float32)
    eyes = (0.3 + 0.05 * np.sin(np.arange(frames) / 7.0)[:, None] * np.ones(2)).astype(np.float32)
    hubert = rng.standard_normal((frames, 1024)).astype(np.float32)
    return portrait, hubert, Motion(pose=source_pose + walk, eyes=eyes)


def pipeline_noise(options: RenderOptions, shape: tuple, device) -> list[torch.Tensor]:
    """The noise `RenderPipeline.sample_flows` draws for one render: x_T, then one draw per DDIM step that
    adds noise, from a generator seeded with options.seed; DPM-Solver++ draws x_T only."""
    pairs = ddim_timesteps(options.steps)
    adds_noise = options.sampler == "ddim" and options.eta > 0
    draws = 1 + (sum(t_next > 0 for _, t_next in pairs) if adds_noise else 0)
    generator = torch.Generator(device=device).manual_seed(options.seed)
    return [torch.randn(shape, generator=generator, device=device) for _ in range(draws)]


def autocast(device: torch.device, dtype: torch.dtype):
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def reference_sample_flows(pipeline: RenderPipeline, portrait: Portrait, hubert: np.ndarray, motion: Motion,
                           options: RenderOptions, calls: list | None = None) -> torch.Tensor:
    """Sampling the reference's way: `reference_forward` at every step (nothing prepared once; appends to
    `calls` at each). Same condition, source features and noise as `pipeline.sample_flows` -> (1, 3, T, L, L)."""
    a2v, device = pipeline.a2v, pipeline.device
    cond = pipeline.condition(portrait, hubert, motion)
    source = pipeline.source_tensor(portrait)
    box = torch.as_tensor(portrait.face_box, dtype=torch.float32, device=device)[None]
    latent = a2v.config.latent_size
    shape = (1, 3, cond.shape[1], latent, latent)
    noise = pipeline_noise(options, shape, device)
    with autocast(device, pipeline.dtype):
        features = a2v.source_features(pipeline.lfg.source_latent(source), box)

        def denoise(x_t, t):
            if calls is not None:
                calls.append(1)
            return reference_forward(a2v, x_t, t, features, cond)

        if options.sampler == "ddim":
            flows = ddim_sample(a2v.schedule, denoise, shape, steps=options.steps, eta=options.eta, noise=noise)
        else:
            flows = dpm_solver_sample(a2v.schedule, denoise, shape, steps=options.steps, noise=noise)
    return flows.float()


@torch.no_grad()
def reference_decode_frames(pipeline: RenderPipeline, portrait: Portrait, flows: torch.Tensor) -> np.ndarray:
    """Decoding the reference's way: frame by frame, the source encoded again for every frame ->
    (T, S, S, 3) uint8, quantised as `decode_frames` does."""
    lfg, device = pipeline.lfg, pipeline.device
    source = pipeline.source_tensor(portrait)
    grids = flows[0, :2].permute(1, 2, 3, 0)
    occlusion = (flows[0, 2:3].transpose(0, 1) + 1) / 2
    t, s = grids.shape[0], source.shape[-1]
    frames = np.empty((t, s, s, 3), dtype=np.uint8)
    with autocast(device, pipeline.dtype):
        for i in range(t):
            frame = lfg.decode(lfg.encode_source(source), source, grids[i:i + 1], occlusion[i:i + 1])
            frames[i] = (frame[0].float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return frames


# --- measuring ----------------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


class PeakMemory:
    """Peak memory of a block above the memory in use when it starts: peak RSS (VmHWM, reset through
    /proc/self/clear_refs) on CPU, max_memory_allocated on CUDA. Bytes."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.start = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.peak = _status_kib("VmHWM") * 1024 - self.start


def timed(fn, device: torch.device):
    """(result, wall s, CPU s of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def matmul_gflops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s (by CPU time on CPU, wall on CUDA) of a size^2 matrix multiply."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b
    best = 0.0
    for _ in range(repeats):
        _, wall, cpu = timed(lambda: a @ b, device)
        best = max(best, 2 * size**3 / (cpu if device.type == "cpu" else wall) / 1e9)
    return best


def unet_gflop(preset: str, frames: int, reference_way: bool) -> float:
    """FLOPs (1e9) of one U-Net denoising step for one render, counted on the meta device: ours is
    `forward_prepared` (what a step runs), the reference way `reference_forward`."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        lfg, a2v = build_models_meta(preset)
        c = a2v.config
        x_t = torch.empty(1, 3, frames, c.latent_size, c.latent_size)
        t = torch.zeros(1, dtype=torch.long)
        features = torch.empty(1, c.source_channels + c.face_channels, c.latent_size, c.latent_size)
        cond = torch.empty(1, frames, c.cond_dim)
        counter = FlopCounterMode(display=False)
        with torch.no_grad():
            if reference_way:
                with counter:
                    reference_forward(a2v, x_t, t, features, cond)
            else:
                context = a2v.prepare(features, cond)
                with counter:
                    a2v.forward_prepared(x_t, t, context)
    return counter.get_total_flops() / 1e9


def build_models_meta(preset: str):
    from dawn.config import build_models as build_preset

    models = build_preset(preset, device="meta")
    return models["lfg"].eval(), models["a2v"].eval()


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of live tensors created under this mode (storages freed when their last tensor dies), their
    peak, and the largest tensors alive at the peak with the module and op that made them. Tensors that
    existed before (weights, inputs given) are not counted. Works on the meta device (no memory used)."""

    def __init__(self, models: list[torch.nn.Module], existing: list[torch.Tensor] = ()):
        super().__init__()
        self.live = self.peak = 0
        self.storages: dict[int, list] = {}  # storage id -> [bytes, live tensors, label]
        self.existing = {t.untyped_storage()._cdata for m in models for t in (*m.parameters(), *m.buffers())}
        self.existing |= {t.untyped_storage()._cdata for t in existing}
        self.at_peak: list[tuple[int, str]] = []
        self.module_stack = ["(no module)"]
        self.hooks = []
        for model in models:
            for name, module in model.named_modules():
                self.hooks.append(module.register_forward_pre_hook(lambda m, a, n=name: self._enter(n)))
                self.hooks.append(module.register_forward_hook(lambda m, a, o: self._leave()))

    def _enter(self, name: str) -> None:
        self.module_stack.append(name)

    def _leave(self) -> None:
        self.module_stack.pop()

    def add(self, nbytes: int, label: str) -> None:
        """Count memory that is not a torch tensor (e.g. the numpy frame buffer) as live."""
        self.live += nbytes
        self._note_peak()

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor, func)
        return out

    def _track(self, tensor: torch.Tensor, func) -> None:
        key = tensor.untyped_storage()._cdata
        if key in self.existing:
            return
        if key not in self.storages:
            nbytes = tensor.untyped_storage().nbytes()
            label = f"{self.module_stack[-1]}: {func.__name__} {tuple(tensor.shape)} {str(tensor.dtype)[6:]}"
            self.storages[key] = [nbytes, 0, label]
            self.live += nbytes
            self._note_peak()
        self.storages[key][1] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.storages[key]

    def _note_peak(self) -> None:
        if self.live > self.peak:
            if self.live > 1.01 * self.peak:  # a snapshot of what is alive, now and then while climbing
                self.at_peak = sorted(((e[0], e[2]) for e in self.storages.values()), reverse=True)[:12]
            self.peak = self.live


@torch.no_grad()
def predict_peak(variant: str, preset: str, frames: int, options: RenderOptions) -> dict:
    """Replay one render's sampling and decoding on the meta device: peak live bytes of each stage (the
    pipeline's noise buffers and uint8 frame buffer included), the bytes of the U-Net's prepared context,
    and the largest tensors alive at the sampling peak. One sampling step is replayed: beyond the noise
    buffers (allocated in full), memory does not grow with the steps."""
    reference_way = variant != "ours"
    lfg, a2v = build_models_meta(preset)
    c, s = a2v.config, lfg.config.image_size
    shape = (1, 3, frames, c.latent_size, c.latent_size)
    meta = torch.device("meta")
    with LiveTensorBytes([lfg, a2v]) as tracker:
        noise = [torch.empty(shape, device=meta) for _ in range(len(pipeline_noise(options, (1,), "cpu")))]
        cond = torch.empty(1, frames, c.cond_dim, device=meta)
        source = torch.empty(1, 3, s, s, device=meta)
        box = torch.empty(1, 6, device=meta)
        features = a2v.source_features(lfg.source_latent(source), box)
        before = tracker.live
        denoise = (a2v.denoiser(features, cond) if not reference_way
                   else (lambda x, t: reference_forward(a2v, x, t, features, cond)))
        context = tracker.live - before
        # DPM-Solver++ reads schedule values on the host: replayed as deterministic DDIM, whose state
        # differs by one (1, 3, T, L, L) tensor (its previous x0)
        eta = options.eta if options.sampler == "ddim" else 0.0
        flows = ddim_sample(a2v.schedule, denoise, shape, steps=1, eta=eta, noise=noise)
        sampling_peak, at_peak = tracker.peak, tracker.at_peak
        del denoise, noise, features, cond
        tracker.peak = tracker.live
        tracker.add(frames * s * s * 3, "frames (T, S, S, 3) uint8")
        batch = 1 if reference_way else decode_batch_size(options.decode_batch, "cpu")
        grids = flows[0, :2].permute(1, 2, 3, 0)[:batch]
        occlusion = (flows[0, 2:3].transpose(0, 1) + 1)[:batch] / 2
        decoded = lfg.decode(lfg.encode_source(source), source, grids, occlusion)
        (decoded.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        decoding_peak = tracker.peak
    return {"frames": frames, "sampling": sampling_peak, "decoding": decoding_peak, "context": context,
            "peak": max(sampling_peak, decoding_peak), "at_peak": at_peak, "extrapolated": False}


REPLAY_FRAMES = (400, 800)  # longer renders: replayed at these lengths and extrapolated (memory is linear)


def predict_peak_any_length(variant: str, preset: str, frames: int, options: RenderOptions) -> dict:
    """`predict_peak`; for ours extrapolated linearly from REPLAY_FRAMES above 2 x the longest of them (a
    replay of ours at thousands of frames runs millions of small attention calls; the reference way's
    memory is quadratic in T, and its replay is fast)."""
    if frames <= 2 * REPLAY_FRAMES[-1] or variant != "ours":
        return predict_peak(variant, preset, frames, options)
    short, long = (predict_peak(variant, preset, n, options) for n in REPLAY_FRAMES)
    scale = (frames - long["frames"]) / (long["frames"] - short["frames"])
    out = {k: long[k] + scale * (long[k] - short[k]) for k in ("sampling", "decoding", "context", "peak")}
    return {**out, "frames": frames, "at_peak": long["at_peak"], "at_peak_frames": long["frames"],
            "extrapolated": True}


def memory_available() -> int:
    return int(re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text()).group(1)) * 1024


# --- one variant in its own process -------------------------------------------------------------------

def run_worker(job: dict) -> dict:
    """Build the models, render once (sampling, then decoding), measure; save flows/frames if asked."""
    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    options = RenderOptions(steps=job["steps"], sampler=job["sampler"], seed=job["seed"])
    ours = job["variant"] == "ours"
    lfg, a2v = build_models(job["preset"], job["weights_seed"], device=job["device"])
    native_ok, native_s, _ = timed(native.load, device)  # a RenderPipeline loads it; timed here on its own
    pipeline = RenderPipeline(lfg=lfg, a2v=a2v, device=job["device"], dtype=job["dtype"]).use_channels_last()
    portrait, hubert, motion = make_inputs(lfg.config.image_size, job["frames"], seed=job["seed"])
    matmul = [matmul_gflops(device, DTYPES[job["dtype"]])]
    result = {"loaded_bytes": _status_kib("VmRSS") * 1024 if device.type == "cpu" else torch.cuda.memory_allocated()}
    result["native"] = {"loaded": native_ok and device.type == "cpu", "seconds": native_s}

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = job.get("cudnn_benchmark", False)
        # warm-up render (2 steps): CUDA context, library handles and kernel choices stay out of the timings
        warm = dataclasses.replace(options, steps=2)
        if ours:
            pipeline.decode_frames(portrait, pipeline.sample_flows(portrait, hubert, motion, warm), warm.decode_batch)
        else:
            reference_decode_frames(pipeline, portrait, reference_sample_flows(pipeline, portrait, hubert, motion, warm))
    calls = count_unet_calls(a2v) if ours else []
    with PeakMemory(device) as sampling_memory:
        if ours:
            flows, wall, cpu = timed(lambda: pipeline.sample_flows(portrait, hubert, motion, options), device)
        else:
            flows, wall, cpu = timed(lambda: reference_sample_flows(pipeline, portrait, hubert, motion, options, calls),
                                     device)
    result["sampling"] = {"wall": wall, "cpu": cpu, "peak": sampling_memory.peak}
    result["unet_calls"] = len(calls)
    with PeakMemory(device) as decoding_memory:
        if ours:
            frames, wall, cpu = timed(lambda: pipeline.decode_frames(portrait, flows, options.decode_batch), device)
        else:
            frames, wall, cpu = timed(lambda: reference_decode_frames(pipeline, portrait, flows), device)
    # the decoding peak is above a start that already holds the flows: report both above the loaded state
    result["decoding"] = {"wall": wall, "cpu": cpu, "peak": decoding_memory.peak + decoding_memory.start
                          - sampling_memory.start}
    if job.get("frames_out"):
        np.save(job["frames_out"], frames)
    matmul.append(matmul_gflops(device, DTYPES[job["dtype"]]))
    result["matmul_gflops"] = matmul
    if job.get("flows_out"):
        np.save(job["flows_out"], flows.cpu().numpy())
    return result


def count_unet_calls(a2v) -> list:
    """A list that grows by one at every U-Net step of a2v's denoiser (it runs `unet.forward_prepared`)."""
    calls = []
    forward_prepared = a2v.unet.forward_prepared
    a2v.unet.forward_prepared = lambda *args: calls.append(1) or forward_prepared(*args)
    return calls


def spawn(job: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {job['variant']} {job['preset']} {job['frames']} frames failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the reports --------------------------------------------------------------------------------------

def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.0f}"


def render_one(args, variant: str, preset: str, frames: int, steps: int, sampler: str, outputs: Path | None,
               predicted: dict | None = None) -> dict:
    """Predict the variant's memory; run it in a subprocess unless it cannot fit. Result dict."""
    options = RenderOptions(steps=steps, sampler=sampler, seed=args.seed)
    predicted = predicted or predict_peak_any_length(variant, preset, frames, options)
    result = {"variant": variant, "preset": preset, "frames": frames, "steps": steps, "sampler": sampler,
              "predicted": predicted}
    available = memory_available()
    if args.device == "cpu" and predicted["peak"] > 0.9 * available:
        result["skipped"] = (f"needs ~{predicted['peak'] / GIB:.1f} GiB of live tensors, "
                             f"{available / GIB:.1f} GiB available")
        return result
    job = {"variant": variant, "preset": preset, "frames": frames, "steps": steps, "sampler": sampler,
           "seed": args.seed, "weights_seed": args.weights_seed, "threads": args.threads, "device": args.device,
           "dtype": args.dtype if variant == "ours" else args.baseline_dtype, "cudnn_benchmark": args.cudnn_benchmark}
    if outputs is not None:
        tag = variant.replace(" ", "_")
        job["flows_out"], job["frames_out"] = str(outputs / f"{tag}_flows.npy"), str(outputs / f"{tag}_frames.npy")
    result.update(spawn(job))
    result["total"] = {k: result["sampling"][k] + result["decoding"][k] for k in ("wall", "cpu")}
    result["peak"] = max(result["sampling"]["peak"], result["decoding"]["peak"])
    return result


def header(args, preset: str) -> str:
    from dawn.models.lfg import LFGConfig

    s = LFGConfig.preset(preset).image_size
    dtypes = args.dtype if args.dtype == args.baseline_dtype else f"ours {args.dtype} / reference way {args.baseline_dtype}"
    return (f"{preset} ({s} px, latent {s // 4}x{s // 4}), {dtypes}, {args.device}, {args.threads} torch "
            f"thread(s), random weights (seed {args.weights_seed}), noise seed {args.seed}")


def compare(args) -> None:
    """The headline: ours vs the reference way at each frame count and sampler."""
    preset = args.presets[0]
    for frames in args.frames:
        for sampler in args.sampler:
            flops = {v: unet_gflop(preset, frames, v != "ours") for v in VARIANTS}
            with tempfile.TemporaryDirectory() as tmp:
                results = {v: render_one(args, v, preset, frames, args.steps, sampler, Path(tmp))
                           for v in VARIANTS[: 1 if args.skip_baseline else 2]}
                differences = output_differences(Path(tmp)) if len(results) == 2 else None
            calls = results["ours"]["unet_calls"]
            print(f"render: {header(args, preset)}; {frames} frames, {sampler} {args.steps} steps "
                  f"({calls} U-Net calls)")
            print(f"{'':<15}{'sampling s':>17}{'decoding s':>17}{'total s':>17}{'peak MiB':>10}{'live MiB':>10}"
                  f"{'U-Net GFLOP/s':>15}{'of matmul':>11}")
            per = "per CPU-s" if args.device == "cpu" else "(wall)"
            print(f"{'':<15}{'(wall / CPU)':>17}{'(wall / CPU)':>17}{'(wall / CPU)':>17}"
                  f"{'(RSS)' if args.device == 'cpu' else '(CUDA)':>10}{'(meta)':>10}{per:>15}")
            for variant, r in results.items():
                if "skipped" in r:
                    print(f"{variant:<15} skipped: {r['skipped']}")
                    continue
                seconds = r["sampling"]["cpu" if args.device == "cpu" else "wall"]
                gflops = flops[variant] * calls / seconds
                matmul = statistics.mean(r["matmul_gflops"])
                print(f"{variant:<15}" + "".join(f"{r[k]['wall']:>8.1f} /{r[k]['cpu']:>7.1f}"
                                                 for k in ("sampling", "decoding", "total"))
                      + f"{mib(r['peak']):>10}{mib(r['predicted']['peak']):>10}{gflops:>15.1f}{gflops / matmul:>10.0%}")
            ours = results["ours"]
            print(f"U-Net GFLOP per call: ours {flops['ours']:.1f} (forward_prepared), reference way "
                  f"{flops['reference way']:.1f} (reference_forward); matmul 2048^2 in each variant's dtype, GFLOP/s "
                  f"{per}, before and after its render: " + "; ".join(
                      f"{v} " + ", ".join(f"{g:.0f}" for g in r["matmul_gflops"])
                      for v, r in results.items() if "skipped" not in r))
            if ours.get("native", {}).get("loaded"):
                print(f"ours: native CPU kernels (dawn/models/native.py: temporal attention, cross-attention "
                      f"coefficients) loaded before the render in {ours['native']['seconds']:.1f} s (a build, or "
                      f"the cached library)")
            elif args.device == "cpu":
                print("ours: native CPU kernels unavailable (PyTorch's formulations used)")
            baseline = results.get("reference way")
            if baseline and "skipped" not in baseline:
                ratio = {k: baseline["total"][k] / ours["total"][k] for k in ("wall", "cpu")}
                clock = "cpu" if args.device == "cpu" else "wall"
                print(f"reference way / ours: total x{ratio['wall']:.2f} wall, x{ratio['cpu']:.2f} CPU; sampling "
                      f"x{baseline['sampling'][clock] / ours['sampling'][clock]:.2f} {clock}, decoding "
                      f"x{baseline['decoding'][clock] / ours['decoding'][clock]:.2f} {clock}; peak memory "
                      f"x{baseline['peak'] / ours['peak']:.2f}")
                print(f"max |ours - reference way|: flows {differences['flows']:.1e}; frames "
                      f"{differences['frames_levels']} / 255 ({differences['frames_differing']:.4%} of values differ)")
            print()


def output_differences(outputs: Path) -> dict:
    flows = [np.load(outputs / f"{v.replace(' ', '_')}_flows.npy") for v in VARIANTS]
    frames = [np.load(outputs / f"{v.replace(' ', '_')}_frames.npy").astype(np.int16) for v in VARIANTS]
    delta = np.abs(frames[0] - frames[1])
    return {"flows": float(np.abs(flows[0] - flows[1]).max()), "frames_levels": int(delta.max()),
            "frames_differing": float((delta > 0).mean())}


def scaling(args, lengths: list[int], presets: list[str]) -> None:
    """Time and peak memory of each length as ratios to the first length, per preset and variant."""
    for preset in presets:
        variants = VARIANTS[: 1 if args.skip_baseline else 2]
        clock = "cpu" if args.device == "cpu" else "wall"
        print(f"length scaling: {header(args, preset)}; {args.sampler[0]} {args.steps} steps; ratios to the "
              f"first row (time: total {'CPU' if clock == 'cpu' else 'wall'} s; memory: peak "
              f"{'RSS' if clock == 'cpu' else 'CUDA memory'} above the loaded weights)")
        print(f"{'variant':<15}{'frames':>7}{'audio s':>8}{'sampling s':>12}{'decoding s':>12}{'total s':>10}"
              f"{'x time':>8}{'peak MiB':>10}{'x memory':>10}{'live MiB':>10}{'x live':>8}")
        for variant in variants:
            first = None
            for frames in lengths:
                r = render_one(args, variant, preset, frames, args.steps, args.sampler[0], None)
                if "skipped" in r:
                    print(f"{variant:<15}{frames:>7}{frames / 25:>8.0f}  skipped: {r['skipped']}")
                    continue
                first = first or r
                print(f"{variant:<15}{frames:>7}{frames / 25:>8.0f}{r['sampling'][clock]:>12.1f}"
                      f"{r['decoding'][clock]:>12.1f}{r['total'][clock]:>10.1f}"
                      f"{r['total'][clock] / first['total'][clock]:>8.2f}{mib(r['peak']):>10}"
                      f"{r['peak'] / first['peak']:>10.2f}{mib(r['predicted']['peak']):>10}"
                      f"{r['predicted']['peak'] / first['predicted']['peak']:>8.2f}")
        print()


def long_audio(args) -> None:
    """A render of `--long-audio-minutes`: predicted peak, the prepared context and the largest tensors
    alive at the peak (per frame); the render itself when it fits in the available memory."""
    preset = args.presets[0]
    frames = int(args.long_audio_minutes * 60 * 25)
    options = RenderOptions(steps=args.steps, sampler=args.sampler[0], seed=args.seed)
    predicted = predict_peak_any_length("ours", preset, frames, options)
    how = (f"extrapolated from replays at {' and '.join(map(str, REPLAY_FRAMES))} frames"
           if predicted["extrapolated"] else "replayed")
    print(f"long audio: {args.long_audio_minutes:g} min = {frames} frames, {header(args, preset)}; "
          f"{args.sampler[0]} {args.steps} steps")
    print(f"live tensors (meta device, {how}): sampling peak {predicted['sampling'] / GIB:.2f} GiB "
          f"({predicted['sampling'] / frames / 2**10:.0f} KiB per frame), of which the U-Net's prepared context "
          f"{predicted['context'] / GIB:.2f} GiB ({predicted['context'] / frames / 2**10:.0f} KiB per frame); "
          f"decoding peak {predicted['decoding'] / GIB:.2f} GiB")
    print(f"24 GiB budget: {'fits' if predicted['peak'] <= 24 * GIB else 'does NOT fit'}")
    replayed = predicted.get("at_peak_frames", frames)
    print(f"largest tensors alive at the sampling peak (replay of {replayed} frames):")
    for nbytes, label in predicted["at_peak"]:
        print(f"  {nbytes / replayed / 2**10:8.1f} KiB per frame  {label}")
    r = render_one(args, "ours", preset, frames, args.steps, args.sampler[0], None, predicted=predicted)
    if "skipped" in r:
        print(f"render not run: {r['skipped']}")
    else:
        print(f"measured: sampling {r['sampling']['wall']:.0f} s wall, decoding {r['decoding']['wall']:.0f} s wall, "
              f"peak RSS above the loaded weights {r['peak'] / GIB:.2f} GiB "
              f"({'within' if r['peak'] <= 24 * GIB else 'over'} 24 GiB)")
    print()


@torch.no_grad()
def profile(args) -> None:
    """torch.profiler: the ops that take the time in one U-Net step of each variant (self CPU time)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    preset, frames = args.presets[0], args.frames[0]
    for variant in VARIANTS[: 1 if args.skip_baseline else 2]:
        _, a2v = build_models(preset, args.weights_seed, device=args.device)
        c = a2v.config
        g = torch.Generator().manual_seed(args.seed)
        x_t = torch.randn(1, 3, frames, c.latent_size, c.latent_size, generator=g).to(args.device)
        features = torch.randn(1, c.source_channels + c.face_channels, c.latent_size, c.latent_size,
                               generator=g).to(args.device)
        cond = torch.randn(1, frames, c.cond_dim, generator=g).to(args.device)
        t = torch.tensor([500], device=args.device)
        step = (a2v.denoiser(features, cond) if variant == "ours"
                else lambda x, t: reference_forward(a2v, x, t, features, cond))
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            step(x_t, t)
        total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6
        print(f"profile: one U-Net step, {variant}, {header(args, preset)}; {frames} frames; {total:.1f} s self CPU "
              f"in ops")
        sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=args.profile_rows, max_name_column_width=40))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--presets", "--preset", nargs="+", default=["hdtf128"])
    parser.add_argument("--frames", nargs="+", type=int, default=[200])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", nargs="+", default=["ddim"], choices=["ddim", "dpm-solver++"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="ours (autocast as `dawn render`)")
    parser.add_argument("--baseline-dtype", default="fp32", choices=sorted(DTYPES),
                        help="the reference way (the official inference runs float32)")
    parser.add_argument("--seed", type=int, default=0, help="noise and input seed")
    parser.add_argument("--weights-seed", type=int, default=0)
    parser.add_argument("--cudnn-benchmark", action="store_true", help="CUDA: let cuDNN time its convolution algorithms")
    parser.add_argument("--skip-baseline", action="store_true", help="run ours only")
    parser.add_argument("--lengths", nargs="+", type=int, help="length scaling (frames): ratios to the first")
    parser.add_argument("--audio-seconds", nargs="+", type=float,
                        help="time and memory for these audio lengths at each of --presets, ratios to the first")
    parser.add_argument("--long-audio-minutes", type=float, help="predict (and run if it fits) a render this long")
    parser.add_argument("--profile", action="store_true", help="top ops of one U-Net step of each variant")
    parser.add_argument("--profile-rows", type=int, default=15)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return
    torch.set_num_threads(args.threads)
    if args.profile:
        profile(args)
    elif args.long_audio_minutes:
        long_audio(args)
    elif args.lengths:
        scaling(args, args.lengths, args.presets[:1])
    elif args.audio_seconds:
        scaling(args, [round(s * 25) for s in args.audio_seconds], args.presets)
    else:
        compare(args)


if __name__ == "__main__":
    main()
