"""Peak memory of loading a real-size LLM: ``load_llm`` against the build-then-load it replaced.

Writes a random Llama-layout LLM of 1.1B parameters (TinyLlama-1.1B's shape: width 2048, 22 layers, 32
heads with 4 key/value heads, MLP 5632, vocabulary 32000) in bf16, sharded with an index, into an
InstructBLIP-layout directory whose vision tower, Q-Former and tokenizers come from ``init-tiny``. Then
each loader runs in a fresh process, and the script prints that process's peak RSS growth (VmHWM after
the load minus VmRSS before it) over the LLM's bytes in the checkpoint. Target for ``load_llm``: <= 1.25x.

- ``new``: ``dualfocus.pipeline.models.load_llm`` (parameters on the meta device, tensors read one at a
  time straight into the target dtype);
- ``previous``: the loader before it: ``from_config`` with random weights, then a full state dict read
  with safetensors' default backend and copied over them.

After the load every parameter is read once, so memory a loader only maps lazily is counted too; a
4-token forward pass then checks that the model works.

    python benchmarks/load_llm.py                          # checkpoint in a temp dir, deleted afterwards
    python benchmarks/load_llm.py --work /data/bench --keep  # keep (and later reuse) the checkpoint
    python benchmarks/load_llm.py --dtype float32          # load the bf16 checkpoint into fp32

Needs about 2.2 GB of disk and, for ``previous``, about 2x that in RAM.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLM_SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, head_dim=64, vocab_size=32000, tie_word_embeddings=False)
"""TinyLlama-1.1B's layout: a Llama-2 block structure at 1.1B parameters."""

SHARD_BYTES = 1 << 30
LLM_PREFIX = "language_model."


# ---------------------------------------------------------------------------------------------- checkpoint
def write_checkpoint(out: Path, seed: int = 0) -> int:
    """Write the InstructBLIP-layout directory with the 1.1B LLM to ``out``; return the LLM's bytes."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from dualfocus.pipeline.models import load_config, parameters_on_meta
    from dualfocus.pipeline.tiny import write_tiny_model

    write_tiny_model(out)  # vision tower, Q-Former, tokenizers, preprocessor config; a tiny LLM to replace
    raw = json.loads((out / "config.json").read_text())
    raw["text_config"].update(LLM_SHAPE)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    with parameters_on_meta():  # names and shapes only, from the config just written
        skeleton = AutoModelForCausalLM.from_config(load_config(out).text_config, dtype=torch.bfloat16)
    shapes = {LLM_PREFIX + name: tuple(p.shape) for name, p in skeleton.state_dict().items()}

    others = {k: v for k, v in load_file(out / "model.safetensors").items() if not k.startswith(LLM_PREFIX)}
    (out / "model.safetensors").unlink()
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n_files = len(shards) + 1
    files = [f"model-{i + 1:05d}-of-{n_files:05d}.safetensors" for i in range(n_files)]
    save_file(others, out / files[0], metadata={"format": "pt"})
    weight_map = dict.fromkeys(others, files[0])
    generator = torch.Generator().manual_seed(seed)
    for file, names in zip(files[1:], shards):
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                tensors[name] = torch.empty(shapes[name], dtype=torch.bfloat16).normal_(0.0, 0.02, generator=generator)
        save_file(tensors, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        print(f"  wrote {file} ({sum(t.nbytes for t in tensors.values()) / 2**30:.2f} GiB)", flush=True)
        del tensors
    llm_bytes = sum(2 * int(torch.Size(s).numel()) for s in shapes.values())
    total = llm_bytes + sum(t.nbytes for t in others.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "llm_bytes").write_text(str(llm_bytes))
    return llm_bytes


# ---------------------------------------------------------------------------------------------- loaders
def load_previous(model_dir: str, dtype: str):
    """The loader before the meta-device one: random weights, then a full state dict copied over them."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from dualfocus.pipeline.models import load_config, weight_files

    model = AutoModelForCausalLM.from_config(load_config(model_dir).text_config, dtype=getattr(torch, dtype))
    state = {}
    for name, file in weight_files(Path(model_dir)).items():
        if name.startswith(LLM_PREFIX):
            with safe_open(str(file), framework="pt") as f:
                state[name[len(LLM_PREFIX):]] = f.get_tensor(name)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model.eval()


def load_new(model_dir: str, dtype: str):
    from dualfocus.pipeline.models import load_llm

    return load_llm(model_dir, dtype=dtype)


def memory_mib() -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of this process, in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def measure(model_dir: str, loader: str, dtype: str) -> dict:
    """Run in a fresh process: load with ``loader`` and report the peak RSS growth it caused."""
    import torch

    from dualfocus.pipeline.models import load_config

    load_config(model_dir)  # imports the config classes: part of the baseline, not of the load
    before = memory_mib()["VmRSS"]
    start = time.perf_counter()
    model = {"new": load_new, "previous": load_previous}[loader](model_dir, dtype)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        for p in model.parameters():
            p.amax()  # reads every page of every parameter
        peak = memory_mib()["VmHWM"]
        logits = model(torch.tensor([[1, 15, 27, 3]])).logits
    params = sum(p.numel() for p in model.parameters())
    return {"loader": loader, "dtype": dtype, "params": params, "load_s": seconds,
            "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "baseline_mib": before, "peak_growth_mib": peak - before,
            "logits_finite": bool(torch.isfinite(logits).all())}


# ---------------------------------------------------------------------------------------------- driver
def run_fresh(model_dir: Path, loader: str, dtype: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, __file__, "--measure", loader, "--model", str(model_dir), "--dtype", dtype],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"the {loader} loader failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="directory for the checkpoint (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    parser.add_argument("--dtype", default="bfloat16", help="dtype to load into (the checkpoint is bf16)")
    parser.add_argument("--loaders", default="new,previous", help="comma-separated: new, previous")
    parser.add_argument("--measure", choices=["new", "previous"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.model, args.measure, args.dtype)))
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="dualfocus-load-llm-"))
    model_dir = work / "model"
    try:
        if (model_dir / "llm_bytes").is_file():
            llm_bytes = int((model_dir / "llm_bytes").read_text())
            print(f"reusing the checkpoint in {model_dir}")
        else:
            print(f"writing a random 1.1B Llama-layout checkpoint to {model_dir}", flush=True)
            start = time.perf_counter()
            llm_bytes = write_checkpoint(model_dir)
            print(f"  done in {time.perf_counter() - start:.0f} s")
        print(f"LLM bytes in the checkpoint: {llm_bytes / 2**30:.2f} GiB (bf16)\n")
        print(f"{'loader':<10} {'dtype':<9} {'params':>7} {'load s':>7} {'peak RSS growth':>16} "
              f"{'/ checkpoint':>13} {'/ model':>8}  forward")
        for loader in args.loaders.split(","):
            r = run_fresh(model_dir, loader, args.dtype)
            growth = r["peak_growth_mib"] * 2**20
            print(f"{loader:<10} {args.dtype:<9} {r['params'] / 1e9:>6.2f}B {r['load_s']:>7.1f} "
                  f"{r['peak_growth_mib'] / 1024:>12.2f} GiB {growth / llm_bytes:>12.2f}x "
                  f"{growth / r['model_bytes']:>7.2f}x  {'finite' if r['logits_finite'] else 'NOT FINITE'}",
                  flush=True)
    finally:
        if args.keep:
            print(f"\nkept {model_dir}")
        elif args.work is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.rmtree(model_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
