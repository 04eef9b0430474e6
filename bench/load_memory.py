"""Peak memory of each rank while it loads its weights, tp=1 vs tp=2 (issue 6: "each rank's peak
memory for loading weights is about its shard, not the whole model").

The checkpoint is written once under .cache/: Qwen3-0.6B shapes cut to a few layers, random bf16
weights, one model.safetensors of a few hundred MB. Each layout starts in a fresh process that
creates `LLM(ckpt, tp=N)` (the driver is rank 0, workers are ranks 1..N-1) and runs one step (a
forward touches every weight), while a thread samples every rank's /proc/PID/status and smaps.
A rank's weight memory = its anonymous RSS over the driver's after imports + the resident pages of
its *.safetensors mappings (an unsharded load keeps safetensors' mmap, a sharded one reads its
slices with positioned reads); its peak is set next to the bytes the rank reads.

    python bench/load_memory.py [--layers 8] [--tp 1 2] [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_checkpoint(path: Path, layers: int) -> Path:
    import torch
    from safetensors.torch import save_file

    from nanoforge.models.presets import PRESETS
    from nanoforge.models.random_checkpoint import RandomCheckpoint

    config = {**PRESETS["qwen3-0.6b"], "num_hidden_layers": layers}
    if (path / "config.json").is_file() and json.loads((path / "config.json").read_text()) == config:
        return path
    path.mkdir(parents=True, exist_ok=True)
    rc = RandomCheckpoint(config, "random", dtype="bf16")
    tensors = {k: t.to(torch.bfloat16).contiguous() for k, t in rc.read(sorted(rc.tensors), progress=False)}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path


def _memory(pid: int) -> dict[str, int] | None:
    """Bytes resident: anonymous memory, checkpoint pages mapped (safetensors' mmap), and the
    kernel's peak RSS (VmHWM); None once the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        smaps = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return None
    kb = {k: int(v.split()[0]) * 1024 for k, _, v in (ln.partition(":") for ln in status.splitlines())
          if k in ("VmHWM", "RssAnon")}
    ckpt, mapped = 0, False
    for line in smaps.splitlines():
        head = line.split(None, 5)
        if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's header line
            mapped = len(head) == 6 and head[5].endswith(".safetensors")
        elif mapped and line.startswith("Rss:"):
            ckpt += int(line.split()[1]) * 1024
    return {"anon": kb.get("RssAnon", 0), "ckpt": ckpt, "hwm": kb.get("VmHWM", 0)}


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def child(ckpt: Path, tp: int) -> dict:
    """One layout in this (fresh) process: start the ranks, sample them, report."""
    import torch  # noqa: F401  (the imports every rank makes come before the baseline)

    import nanoforge.runtime.distributed_runner  # noqa: F401
    from nanoforge import LLM
    from nanoforge.parallel.rank_view import model_bytes, rank_slices

    me = os.getpid()
    base = _memory(me)
    peaks: dict[int, dict[str, int]] = {}
    stop = threading.Event()

    def sample() -> None:
        pids: list[int] = [me]
        n = 0
        while not stop.is_set():
            if n % 10 == 0:
                pids = [me, *_children(me)]
            for pid in pids:
                m = _memory(pid)
                if m is not None:
                    p = peaks.setdefault(pid, {"anon": 0, "ckpt": 0, "weights": 0})
                    p["anon"], p["ckpt"] = max(p["anon"], m["anon"]), max(p["ckpt"], m["ckpt"])
                    p["weights"] = max(p["weights"], m["anon"] - base["anon"] + m["ckpt"])
            n += 1
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    llm = LLM(ckpt, tp=tp, dtype="bf16", num_blocks=16, max_model_len=256, progress=False)
    load_s = time.perf_counter() - start
    # one step touches every weight: safetensors may hand out whole tensors still backed by its
    # mmap (pages read on first use), so only after a forward are all of a rank's weights resident
    from nanoforge import SamplingParams

    llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    time.sleep(0.05)
    stop.set()
    thread.join()
    runner = llm.engine.runner
    ranks = [me] + [p.pid for p in getattr(runner, "workers", [])]
    module = llm.plan.module
    out = {"tp": tp, "load_s": round(load_s, 2), "model_bytes": model_bytes(module),
           "baseline": {"anon": base["anon"], "rss": base["hwm"]}, "ranks": []}
    for rank, pid in enumerate(ranks):
        end_ = _memory(pid) or {"anon": 0, "ckpt": 0, "hwm": 0}
        p = peaks.get(pid, {"anon": 0, "ckpt": 0, "weights": 0})
        reads = sum(ks.nbytes for ks in rank_slices(module, rank))
        out["ranks"].append({"rank": rank, "pid": pid, "reads_bytes": reads, "peak_weights": p["weights"],
                             "peak_anon": p["anon"], "peak_ckpt_mapped": p["ckpt"],
                             "end_weights": end_["anon"] - base["anon"] + end_["ckpt"], "vm_hwm": end_["hwm"]})
    llm.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--ckpt", type=Path, default=ROOT / ".cache" / "load_memory_ckpt")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.ckpt, a.child)))
        return
    ckpt = make_checkpoint(a.ckpt, a.layers)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    runs = []
    for tp in a.tp:
        r = subprocess.run([sys.executable, __file__, "--child", str(tp), "--ckpt", str(ckpt)], capture_output=True,
                           text=True, check=True)
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    mib = lambda n: round(n / 2**20, 1)  # noqa: E731
    result = {"benchmark": "load_memory", "checkpoint": {"path": str(ckpt), "bytes": size, "layers": a.layers,
                                                         "shapes": "qwen3-0.6b", "dtype": "bf16"},
              "host": {"cpus": os.cpu_count()}, "runs": runs,
              "note": "weights = RssAnon over the driver's RssAnon after imports + Rss of the mmapped "
                      "*.safetensors mappings (/proc/PID/smaps), sampled every ~5-20 ms from start-up through one "
                      "step; vm_hwm = the kernel's peak RSS of the whole process (code pages, libraries included)"}
    for run in runs:
        for r in run["ranks"]:
            print(f"tp={run['tp']} rank {r['rank']}: reads {mib(r['reads_bytes']):7.1f} MiB; weights resident: peak "
                  f"{mib(r['peak_weights']):7.1f} MiB, after a step {mib(r['end_weights']):7.1f} MiB "
                  f"(checkpoint pages mapped at peak {mib(r['peak_ckpt_mapped']):.1f} MiB); VmHWM "
                  f"{mib(r['vm_hwm']):.1f} MiB")
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"load_memory-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"checkpoint {mib(size)} MiB; wrote {path}")


if __name__ == "__main__":
    main()
