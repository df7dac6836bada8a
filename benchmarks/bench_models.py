"""Model benchmark: parameters, forward and training-step time per preset and task, and the
time to load a release-size CryoSiam v1.0 checkpoint.

For each (preset, task): parameter count, forward time in eval mode and one training step
(forward + backward) on a batch of random patches, median of ``--repeats`` runs after one
warm-up, on the device ``cryosiam_nb.device.pick_device`` chooses (2 CPU threads on CPU).
The published-checkpoint row writes a random state dict with the names and shapes of
``shared/upstream_checkpoint_layout.tsv`` (DenseSimSiam backbone + instance heads, about
36 M values) and times ``models.load`` on it.

    python benchmarks/bench_models.py --quick    # tiny at 24³, paper forward at 16³ (< 1 min unloaded)
    python benchmarks/bench_models.py            # tiny at 32³ and 48³, paper at 32³
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]
from _common import emit  # noqa: E402

from cryosiam_nb import models  # noqa: E402
from cryosiam_nb.device import pick_device  # noqa: E402

LAYOUT = [REPO.parent / "shared" / "upstream_checkpoint_layout.tsv",
          Path("/work/shared/upstream_checkpoint_layout.tsv")]  # fmt: skip


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _bench(preset: str, task: str, size: int, batch: int, repeats: int, train: bool) -> dict:
    torch.manual_seed(0)
    dev = pick_device()
    model = models.build(task, preset).to(dev)
    x = torch.rand(batch, 1, size, size, size, device=dev)
    n_par = sum(p.numel() for p in model.parameters())

    def fwd():
        with torch.no_grad():
            model.eval()(x)

    def step():
        model.train()
        model.zero_grad(set_to_none=True)
        if task == "dense_ssl":
            o1, o2 = model.ssl_forward(x, x)
            loss = models.losses.dense_simsiam_loss(o1, o2)["loss"]
        elif task == "subtomo_ssl":
            loss = models.losses.simsiam_loss(*model.ssl_forward(x, x))
        else:
            loss = sum(v.float().mean() for v in model(x).values())
        loss.backward()

    row = {
        "preset": preset,
        "task": task,
        "params (M)": round(n_par / 1e6, 3),
        "input": f"{batch}×{size}³",
        "forward (s)": round(_time(fwd, repeats), 3),
    }
    row["train step (s)"] = round(_time(step, repeats), 3) if train else None
    return row


def _published_load(repeats: int) -> dict | None:
    layout = next((p for p in LAYOUT if p.is_file()), None)
    if layout is None:
        return None
    sections, cur = {}, None
    for line in layout.read_text().splitlines():
        if line.startswith("#"):
            word = line[1:].strip().split(" ")[0]
            if word in ("DenseSimSiam", "InstanceHeads", "SemanticHeads", "CNNHead", "SimSiam"):
                cur = word if word in ("DenseSimSiam", "InstanceHeads") else None
                if cur:
                    sections[cur] = {}
            continue
        if cur and line.strip():
            k, s = line.split("\t")
            sections[cur][k] = tuple(int(v) for v in s.strip("()").split(",") if v.strip())
    g = torch.Generator().manual_seed(0)

    def rand(shape, key):
        if key.endswith("num_batches_tracked"):
            return torch.tensor(1)
        t = torch.rand(shape, generator=g)
        return t + 0.5 if key.endswith("running_var") else t * 0.02

    sd = {f"_model_backbone.{k}": rand(s, k) for k, s in sections["DenseSimSiam"].items()}
    sd.update({f"_model.{k}": rand(s, k) for k, s in sections["InstanceHeads"].items()})
    net = {"block_type": "bottleneck", "spatial_dims": 3, "in_channels": 1,
           "num_layers": [1, 1, 1, 1], "num_filters": [64, 128, 256, 512], "fpn_channels": 128,
           "no_max_pool": True, "dim": 2048, "pred_dim": 512, "dense_dim": 64,
           "dense_pred_dim": 64, "include_levels_loss": True}  # fmt: skip
    hp = {"backbone_config": {"parameters": {"network": net}},
          "config": {"parameters": {"data": {"patch_size": 128},
                                    "network": {"filters": [32, 64], "kernel_size": 3}}}}  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "instance.ckpt"
        torch.save({"state_dict": sd, "hyper_parameters": hp}, path)
        size_mb = path.stat().st_size / 2**20
        t = _time(lambda: models.load(path), repeats)
    return {
        "preset": "CryoSiam v1.0 (release sizes)",
        "task": "instance: models.load()",
        "params (M)": round(sum(v.numel() for v in sd.values()) / 1e6, 3),
        "input": f"{size_mb:.0f} MiB file",
        "forward (s)": round(t, 3),
        "train step (s)": None,
    }


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized run (< 1 min)")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    repeats = args.repeats or (1 if args.quick else 3)
    rows = []
    dense = ["dense_ssl", "denoise", "semantic", "instance"]
    if args.quick:
        plan = [("tiny", t, 24, 2, True) for t in dense] + [("tiny", "subtomo_ssl", 32, 4, True)]
        plan += [("paper", "instance", 16, 1, False)]
    else:
        plan = [("tiny", t, 32, 2, True) for t in dense] + [("tiny", t, 48, 2, True) for t in dense]
        plan += [("tiny", "subtomo_ssl", 32, 8, True)]
        # batch 2: the global projector's BatchNorm1d cannot train on a batch of 1
        plan += [("paper", t, 32, 2, True) for t in dense] + [("paper", "subtomo_ssl", 64, 2, True)]
    for preset, task, size, batch, train in plan:
        rows.append(_bench(preset, task, size, batch, repeats, train))
        print(rows[-1], flush=True)
    pub = _published_load(repeats)
    if pub:
        rows.append(pub)
    df = pd.DataFrame(rows)
    emit(df, "bench_models" + ("_quick" if args.quick else ""),
         f"Models: size and speed ({pick_device()}, 2 threads; load row: 'forward' = load time)")  # fmt: skip
    return df


if __name__ == "__main__":
    main()
