"""Pretraining throughput: windows/s, MFU and peak memory at mask ratio 0.75.

    python benchmarks/pretrain_throughput.py                 # GPU if present, else a CPU smoke
    python benchmarks/pretrain_throughput.py --device cpu --batch 2 --steps 2 --warmup 1

Models, all trained with AdamW on random [424, 200] windows (median of --steps timed steps
after --warmup):
  ours          BrainLMForPretraining at --profile (13m by default): SDPA, masked-tail decoder
  ours-compile  the same under torch.compile (CUDA only unless --compile-cpu)
  eager         the same shape with plain eager attention (materialised [S, S] scores)
  hf-vitmae     transformers ViTMAEForPreTraining with SDPA on the 432x432 canvas of the
                released 111M model (what a user would run otherwise)
FLOPs per window are counted from the shapes (matrix products and attention, forward x 3 for
training; the full decoder is counted even where ours skips work), so MFU compares like with
like. Each configuration runs in its own process (clean peak memory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

P, T, PATCH, RATIO = 424, 200, 20, 0.75
PEAK_TFLOPS = {  # dense matrix throughput used for MFU (anchors.md: ~800 bf16 on H100)
    "H100": {"bf16": 800.0, "fp32": 400.0},  # fp32 runs as TF32 matmuls (allowed below)
    "H200": {"bf16": 800.0, "fp32": 400.0},
}


def layer_flops(n: int, h: int, m: int) -> float:
    """Forward FLOPs of one transformer block on n tokens (qkv, proj, MLP, attention)."""
    return 8 * n * h * h + 4 * n * h * m + 4 * n * n * h


def flops_ours(cfg) -> float:
    length = P * (T // cfg.patch_size)
    n_keep = length - round(RATIO * length)
    enc = cfg.num_hidden_layers * layer_flops(1 + n_keep, cfg.hidden_size, cfg.intermediate_size)
    dec = cfg.decoder_num_hidden_layers * layer_flops(1 + length, cfg.decoder_hidden_size,
                                                      cfg.decoder_intermediate_size)
    return 3 * (enc + dec)


def flops_vitmae(cfg) -> float:
    length = (cfg.image_size // cfg.patch_size) ** 2
    n_keep = int(length * (1 - RATIO))
    enc = cfg.num_hidden_layers * layer_flops(1 + n_keep, cfg.hidden_size, cfg.intermediate_size)
    dec = cfg.decoder_num_hidden_layers * layer_flops(1 + length, cfg.decoder_hidden_size,
                                                      cfg.decoder_intermediate_size)
    embed = 2 * length * cfg.hidden_size * cfg.patch_size ** 2 * cfg.num_channels
    return 3 * (enc + dec + embed)


def run_one(model_name: str, dtype: str, args) -> dict:
    import torch

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    if model_name.startswith("hf"):
        from transformers import ViTMAEForPreTraining

        from brainlm.model.legacy import released_config

        cfg = released_config("111m")
        cfg._attn_implementation = "sdpa"
        model = ViTMAEForPreTraining(cfg).to(device)
        flops = flops_vitmae(cfg)
        x = torch.randn(args.batch, 3, cfg.image_size, cfg.image_size, device=device)

        def step_loss():
            return model(pixel_values=x).loss
    else:
        from brainlm.model.config import BrainLMConfig
        from brainlm.model.modeling import BrainLMForPretraining

        cfg = BrainLMConfig.from_preset(args.profile, window=T, patch_size=PATCH,
                                        mask_ratio=RATIO,
                                        attention_backend="eager" if model_name == "eager"
                                        else "sdpa")
        model = BrainLMForPretraining(cfg).to(device)
        flops = flops_ours(cfg)
        x = torch.randn(args.batch, P, T, device=device)
        coords = torch.rand(P, 3, device=device) * 140 - 70
        fwd = torch.compile(model) if model_name == "ours-compile" else model

        def step_loss():
            return fwd(x, coords).loss
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            loss = step_loss()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    if device.type == "cuda":
        peak_gb = torch.cuda.max_memory_allocated() / 2**30
        name = torch.cuda.get_device_name()
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        name = platform.processor() or platform.machine()
    return {"model": model_name, "dtype": dtype, "batch": args.batch,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "windows_s": args.batch / sec, "step_s": sec, "gflop_per_window": flops / 1e9,
            "tflops": flops * args.batch / sec / 1e12, "peak_gb": peak_gb, "device": name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--profile", default="13m")
    parser.add_argument("--batch", type=int, default=None, help="default 32 on GPU, 2 on CPU")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--models", default=None,
                        help="comma list of ours,ours-compile,eager,hf-vitmae")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="for MFU (default: known cards; none on CPU)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device.startswith("cuda")
    args.batch = args.batch or (32 if cuda else 2)
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args)))
        return
    models = (args.models or ("ours,ours-compile,eager,hf-vitmae" if cuda
                              else "ours,eager,hf-vitmae")).split(",")
    results = []
    for model in models:
        for dtype in args.dtypes.split(","):
            cmd = [sys.executable, __file__, "--one", model, dtype, "--device", args.device,
                   "--profile", args.profile, "--batch", str(args.batch), "--steps",
                   str(args.steps), "--warmup", str(args.warmup)]
            res = subprocess.run(cmd, capture_output=True, text=True,
                                 env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if res.returncode != 0:
                tail = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "?"
                results.append({"model": model, "dtype": dtype, "error": tail})
                continue
            results.append(json.loads(res.stdout.strip().splitlines()[-1]))
    device = next((r["device"] for r in results if "device" in r), args.device)
    peak = args.peak_tflops
    print(f"device: {device}; {P} parcels x {T} timepoints, patch {PATCH}, mask {RATIO}, "
          f"batch {args.batch}, median of {args.steps} steps after {args.warmup}")
    print("\n| model | dtype | params (M) | windows/s | GFLOP/window | TFLOP/s | MFU | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['model']} | {r['dtype']} | failed: {r['error'][:80]} | | | | | |")
            continue
        card = next((v for k, v in PEAK_TFLOPS.items() if k in r["device"]), None)
        p = peak or (card or {}).get(r["dtype"])
        mfu = f"{100 * r['tflops'] / p:.1f} %" if p else "n/a"
        print(f"| {r['model']} | {r['dtype']} | {r['params_m']:.1f} | {r['windows_s']:.1f} | "
              f"{r['gflop_per_window']:.0f} | {r['tflops']:.2f} | {mfu} | {r['peak_gb']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
