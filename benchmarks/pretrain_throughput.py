"""Pretraining throughput: windows/s, MFU and peak memory at mask ratio 0.75.

    python benchmarks/pretrain_throughput.py                 # GPU if present, else a CPU smoke
    python benchmarks/pretrain_throughput.py --device cpu --batch 2 --steps 2 --warmup 1

Models, all trained with AdamW on random [424, 200] windows (median of --steps timed steps
after --warmup):
  ours          BrainLMForPretraining at --profile (13m by default): SDPA, masked-tail decoder
                (bf16 variants follow on CUDA: --extras)
  eager         the same shape with plain eager attention (materialised [S, S] scores)
  hf-vitmae     transformers ViTMAEForPreTraining with SDPA on the 432x432 canvas of the
                released 111M model (what a user would run otherwise)
Variants of ours, joined with '+': compile (torch.compile), graphs (torch.compile with CUDA
graphs, mode reduce-overhead), flash / cudnn / efficient / math (pin the attention kernel, as
`brainlm pretrain --attention-kernel`), ckpt (activation checkpointing), b64 / b128 (batch).
On CUDA the default list adds bf16 rows for the kernels and compile modes (--extras).
FLOPs per window are counted from the shapes (matrix products and attention, forward x 3 for
training; the full decoder is counted even where ours skips work), so MFU compares like with
like. Each configuration runs in its own process (clean peak memory, --timeout each).
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


KERNELS = ("flash", "cudnn", "efficient", "math")
TARGET = {"windows_s": 1000.0, "peak_gb": 8.0, "mfu": 50.0}  # 13m, bf16, batch 32, one H100


def run_one(model_name: str, dtype: str, args) -> dict:
    import torch

    base, *mods = model_name.split("+")
    for mod in mods:
        if mod.startswith("b") and mod[1:].isdigit():
            args.batch = int(mod[1:])
        elif mod not in ("compile", "graphs", "ckpt") + KERNELS:
            raise SystemExit(f"unknown variant '{mod}' in {model_name}")
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    if base == "hf-vitmae":
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
                                        attention_backend="eager" if base == "eager" else "sdpa")
        model = BrainLMForPretraining(cfg).to(device)
        for kernel in set(mods) & set(KERNELS):
            model.set_sdpa_kernel(kernel)
        if "ckpt" in mods:
            model.gradient_checkpointing_enable()
        flops = flops_ours(cfg)
        x = torch.randn(args.batch, P, T, device=device)
        coords = torch.rand(P, 3, device=device) * 140 - 70
        fwd = model
        if "compile" in mods:
            fwd = torch.compile(model)
        elif "graphs" in mods:
            fwd = torch.compile(model, mode="reduce-overhead")

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


def verdict(results: list[dict], profile: str) -> str:
    """The issue's target: met when a bf16 batch-32 row of ours on a GPU meets all three."""
    ours = [r for r in results if "error" not in r and r["model"].split("+")[0] == "ours"
            and r["dtype"] == "bf16" and r["batch"] == 32 and r.get("mfu") is not None]
    if profile != "13m" or not ours:
        return "target (13m, bf16, batch 32, GPU): not measured in this run"
    meets = [r for r in ours if r["windows_s"] >= TARGET["windows_s"]
             and r["peak_gb"] <= TARGET["peak_gb"] and r["mfu"] >= TARGET["mfu"]]
    ok = bool(meets)
    best = max(meets or ours, key=lambda r: r["windows_s"])
    return (f"target (>= {TARGET['windows_s']:.0f} windows/s, <= {TARGET['peak_gb']:g} GiB, "
            f"MFU >= {TARGET['mfu']:g} %): {'met' if ok else 'NOT met'} by {best['model']}: "
            f"{best['windows_s']:.0f} windows/s, {best['peak_gb']:.2f} GiB, MFU {best['mfu']:.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--profile", default="13m")
    parser.add_argument("--batch", type=int, default=None, help="default 32 on GPU, 2 on CPU")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--models", default=None,
                        help="comma list of ours,eager,hf-vitmae and ours+VARIANT (default: "
                        "ours,eager,hf-vitmae; on CUDA the --extras follow)")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--extras", default=None,
                        help="bf16-only rows after the main ones (default on CUDA: each "
                        "attention kernel, CUDA graphs, best-guess combinations, batch 64)")
    parser.add_argument("--timeout", type=float, default=300,
                        help="seconds per configuration (compilation included)")
    parser.add_argument("--budget", type=float, default=None,
                        help="start no configuration after this many seconds (rows skipped)")
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
    models = (args.models or "ours,eager,hf-vitmae").split(",")
    extras = args.extras
    if extras is None:  # most telling first: --budget may cut the tail
        extras = ("ours+compile,ours+cudnn,ours+flash,ours+cudnn+compile,ours+graphs,"
                  "ours+efficient,ours+compile+b64") if cuda and args.models is None else ""
    plan = [(m, d) for m in models for d in args.dtypes.split(",")]
    plan += [(m, "bf16") for m in extras.split(",") if m]
    results = []
    start = time.perf_counter()
    for model, dtype in plan:
        if args.budget and time.perf_counter() - start > args.budget:
            results.append({"model": model, "dtype": dtype,
                            "error": f"skipped: --budget {args.budget:g} s spent"})
            continue
        cmd = [sys.executable, __file__, "--one", model, dtype, "--device", args.device,
               "--profile", args.profile, "--batch", str(args.batch), "--steps",
               str(args.steps), "--warmup", str(args.warmup)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                 env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        except subprocess.TimeoutExpired:
            results.append({"model": model, "dtype": dtype,
                            "error": f"over {args.timeout:g} s"})
            print(f"{model} {dtype}: over {args.timeout:g} s", file=sys.stderr, flush=True)
            continue
        if res.returncode != 0:
            tail = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "?"
            results.append({"model": model, "dtype": dtype, "error": tail})
        else:
            results.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"{model} {dtype}: {results[-1].get('windows_s', results[-1].get('error'))}",
              file=sys.stderr, flush=True)
    device = next((r["device"] for r in results if "device" in r), args.device)
    peak = args.peak_tflops
    print(f"device: {device}; {P} parcels x {T} timepoints, patch {PATCH}, mask {RATIO}, "
          f"batch {args.batch}, median of {args.steps} steps after {args.warmup}")
    print("\n| model | dtype | batch | params (M) | windows/s | GFLOP/window | TFLOP/s | MFU "
          "| peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['model']} | {r['dtype']} | | failed: {r['error'][:80]} | | | | | |")
            continue
        card = next((v for k, v in PEAK_TFLOPS.items() if k in r["device"]), None)
        p = peak or (card or {}).get(r["dtype"])
        r["mfu"] = 100 * r["tflops"] / p if p else None
        mfu = f"{r['mfu']:.1f} %" if p else "n/a"
        print(f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['params_m']:.1f} | "
              f"{r['windows_s']:.1f} | {r['gflop_per_window']:.0f} | {r['tflops']:.2f} | {mfu} "
              f"| {r['peak_gb']:.2f} |")
    print(verdict(results, args.profile))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
