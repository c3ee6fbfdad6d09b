"""Where a training step's work goes, without a GPU: operators, FLOPs and bytes written.

    python benchmarks/step_anatomy.py                     # 13m shape, batch 2, bf16 autocast
    python benchmarks/step_anatomy.py --modeling OLD.py   # the same for another modeling.py

One forward + backward of BrainLMForPretraining at mask ratio 0.75 runs on the CPU under a
dispatch mode that records every ATen operator that is not a view: its count (in eager mode
on a GPU, about one kernel launch each), the FLOPs of matrix products and attention (PyTorch's flop counter) and
the bytes of every tensor it writes. Bytes written are a floor for a GPU's memory traffic,
which is what the non-matrix operators cost there; every figure scales with the batch, so
they are given per window. Ranked by bytes, the table shows which copies are worth removing.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_modeling(path: str | None):
    if path is None:
        from brainlm.model import modeling

        return modeling
    spec = importlib.util.spec_from_file_location("brainlm.model._compared", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def anatomy(modeling, profile: str, batch: int, bf16: bool, p: int = 424, t: int = 200):
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.flop_counter import FlopCounterMode

    from brainlm.model.config import BrainLMConfig

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = defaultdict(lambda: [0, 0])  # name -> [calls, bytes written]
            self.attention_flops = 0  # the CPU attention kernels have no flop formula

        def _attention(self, name, args):
            if "scaled_dot_product" not in name or "for_cpu" not in name:
                return
            q, k = (args[1], args[2]) if name.endswith("_backward") else (args[0], args[1])
            b, h, sq, d = q.shape
            fwd = 4 * b * h * sq * k.shape[-2] * d
            self.attention_flops += 2 * fwd if name.endswith("_backward") else fwd

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            written = sum(x.numel() * x.element_size() for x in tree_flatten(out)[0]
                          if isinstance(x, torch.Tensor))
            name = func.overloadpacket.__name__
            self._attention(name, args)
            if name in ("view", "_unsafe_view", "expand", "transpose", "permute", "t",
                        "slice", "select", "unsqueeze", "squeeze", "split", "split_with_sizes",
                        "detach", "alias", "as_strided", "unbind", "_reshape_alias"):
                return out  # views share storage: no kernel, nothing written
            entry = self.ops[name]
            entry[0] += 1
            entry[1] += written
            return out

    torch.manual_seed(0)
    cfg = BrainLMConfig.from_preset(profile, window=t, patch_size=20, mask_ratio=0.75)
    model = modeling.BrainLMForPretraining(cfg).train()
    x = torch.randn(batch, p, t)
    coords = torch.rand(p, 3) * 140 - 70
    rec, flops = Recorder(), FlopCounterMode(display=False)
    with flops, rec:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(x, coords).loss
        loss.backward()
    return rec.ops, flops.get_total_flops() + rec.attention_flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="13m")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    parser.add_argument("--modeling", default=None, help="another modeling.py to measure")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    ops, flops = anatomy(load_modeling(args.modeling), args.profile, args.batch, not args.fp32)
    b = args.batch
    calls = sum(c for c, _ in ops.values())
    written = sum(w for _, w in ops.values())
    print(f"{args.profile}, 424 x 200 windows, mask 0.75, {'fp32' if args.fp32 else 'bf16'}, "
          f"batch {b}: one training step (forward + backward), per window")
    print(f"operators per step: {calls}; GFLOP per window: {flops / b / 1e9:.0f}; "
          f"MB written per window: {written / b / 1e6:.0f}")
    print("\n| operator | calls | MB written per window | share |")
    print("|---|---|---|---|")
    for name, (c, w) in sorted(ops.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"| {name} | {c} | {w / b / 1e6:.1f} | {100 * w / written:.1f} % |")


if __name__ == "__main__":
    main()
