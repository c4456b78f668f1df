"""A2V-FDM temporal attention: time and peak memory of dawn's local attention vs full masked attention.

    python bench/attention.py [--frames 200 400 800 1600] [--positions 16] [--threads 2] [--repeats 3]

One temporal-attention layer of the hdtf128 U-Net at level 0 (64 channels, 8 heads x 32, RoPE, relative
bias, inference window 40), on (1, 64, T, P) features: P spatial positions (the real layer has 32 x 32 =
1024; fewer keep the T^2 baselines within this machine's memory; every method's cost is linear in P).
Methods, all computing the same function (checked against each other):
- ours: `TemporalAttention` as rendering uses it: positions in chunks, the native CPU kernel
  (`dawn.models.native.banded_attention`; `local_attention`'s sdpa blocks where it is unavailable);
- sdpa + T x T mask: the same layer, attention as one fused sdpa call per chunk with the full (8, T, T)
  relative bias + window mask (`full_attention_bias`);
- reference: `A2VFDM.use_reference_attention()`, the reference's formulation: all positions at once, explicit
  (P, 8, T, T) logits + bias + window mask, max-subtracted softmax.
Each (method, T) runs in its own subprocess (torch.no_grad, float32, CPU). Peak = the process's peak
resident memory during the first call minus its resident memory just before (Linux VmHWM reset through
/proc/self/clear_refs; glibc told to return every allocation above 64 KB to the system at once); time =
median wall and CPU seconds (all threads) of `--repeats` further calls.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

METHODS = ("ours", "sdpa_mask", "reference")
LABELS = {"ours": "ours (local)", "sdpa_mask": "sdpa + TxT mask", "reference": "reference (TxT logits)"}


def _memory_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status").read())[1])


def run_case(method: str, frames: int, positions: int, threads: int, repeats: int) -> dict:
    """In this (fresh) process: build the layer, measure one call's peak memory, then time it."""
    if method != "ours":  # the baselines are PyTorch formulations: no native kernel (dawn/models/native.py)
        os.environ["DAWN_NATIVE_KERNELS"] = "0"
    import torch
    import torch.nn.functional as F

    import dawn.models.unet3d as unet3d
    from dawn.models.attention import full_attention_bias

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = unet3d.A2VConfig.preset("hdtf128")
    layer = unet3d.TemporalAttention(config.dim, config.heads, config.dim_head).eval()
    bias = unet3d.RelativePositionBias(config.heads, config.rel_pos_buckets, config.rel_pos_max_distance)
    torch.nn.init.normal_(bias.relative_attention_bias.weight)
    ctx = unet3d.TemporalContext.build(layer.rotary_emb, bias, frames, config.window, method == "reference", "cpu")
    if method == "sdpa_mask":
        def masked_full_attention(q, k, v, window, bias_fn, block=None):
            mask = full_attention_bias(q.shape[-2], bias_fn, window, q.device, q.dtype)[None]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        unet3d.local_attention = masked_full_attention
    x = torch.randn(1, config.dim, frames, positions, 1).contiguous(memory_format=torch.channels_last_3d)

    with torch.no_grad():
        before = _memory_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        out = layer(x, ctx)
        peak_kb = _memory_kb("VmHWM") - before
        walls, cpus = [], []
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            layer(x, ctx)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    checksum = out[0, :, :, :8].double()  # compared across methods by the parent
    return {"peak_mb": peak_kb / 1024, "wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
            "checksum": checksum.flatten().tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[200, 400, 800, 1600])
    parser.add_argument("--positions", type=int, default=32, help="spatial positions P (sequences)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--case", nargs=2, metavar=("METHOD", "FRAMES"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:
        result = run_case(args.case[0], int(args.case[1]), args.positions, args.threads, args.repeats)
        print(json.dumps(result))
        return

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    results = {}
    for frames in args.frames:
        for method in METHODS:
            cmd = [sys.executable, __file__, "--case", method, str(frames), "--positions", str(args.positions),
                   "--threads", str(args.threads), "--repeats", str(args.repeats)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{method} T={frames} failed:\n{done.stderr[-2000:]}")
            results[method, frames] = json.loads(done.stdout.strip().splitlines()[-1])
        ours = results["ours", frames]["checksum"]
        for method in METHODS[1:]:
            deviation = max(abs(a - b) for a, b in zip(ours, results[method, frames]["checksum"]))
            assert deviation < 1e-4, f"{method} differs from ours at T={frames}: {deviation}"

    print(f"temporal attention, hdtf128 level 0 (64 ch, 8 heads x 32, window 40), {args.positions} positions, "
          f"float32 CPU, {args.threads} torch thread(s)")
    for title, key, unit in (("peak memory of one call", "peak_mb", "MB"), ("time of one call (CPU)", "cpu_s", "s"),
                             ("time of one call (wall)", "wall_s", "s")):
        print(f"\n{title}, {unit}")
        print(f"{'T':>5}" + "".join(f"{LABELS[m]:>24}" for m in METHODS)
              + "".join(f"{m + ' / ours':>20}" for m in METHODS[1:]))
        for frames in args.frames:
            values = [results[m, frames][key] for m in METHODS]
            print(f"{frames:>5}" + "".join(f"{v:>24.3f}" for v in values)
                  + "".join(f"{v / values[0]:>19.1f}x" for v in values[1:]))
    first, last = args.frames[0], args.frames[-1]
    print()
    for method in METHODS:
        growth = [results[method, last][key] / results[method, first][key] for key in ("peak_mb", "cpu_s")]
        print(f"{LABELS[method]:>24}: T {first} -> {last} (x{last / first:.0f}): peak memory x{growth[0]:.1f}, "
              f"CPU time x{growth[1]:.1f}")


if __name__ == "__main__":
    main()
