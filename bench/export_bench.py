#!/usr/bin/env python
"""``llama-sft export`` on a ~1B-parameter LLaMA: time, peak memory, file size and llama.cpp's decode
speed for every ``--outtype``, and for a list of types written from one pass.

The model has random weights (float16, normal with std 0.02), Chinese-LLaMA-2's tokenizer and its
55,296-row vocabulary, hidden 2,048, feed-forward 5,632, 16 layers of 16 heads, saved as safetensors
shards of about 512 MiB in a scratch folder. Each export runs as ``llama-sft export`` in a child
process of its own; its peak RSS is the child's VmHWM (imports included) and its growth is VmHWM
less the RSS before the call. Decode speed is llama.cpp's (llama-cpp-python): 32 greedy tokens after
a short prompt, on all the process's cores, per token after the first. Random weights make
perplexity meaningless, so only sizes and speeds are measured here; quality is docs/export.md's
demo table.

    python bench/export_bench.py            # the ~1B model (about 10 minutes on 2 idle cores, 12 GB of disk)
    python bench/export_bench.py --quick    # hidden 256, 2 layers: a smoke test of the script

Writes bench/results/DATE_MACHINE_export.json (export-quick with --quick), or --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOKENIZER = SHARED / "tokenizers" / "chinese-llama-2"
OUTTYPES = ["f16", "bf16", "q8_0", "f32", "q4_k_m", "q5_k_m", "q6_k", "q4_0", "q5_0"]
LIST_FORM = "f16,q8_0,q4_k_m,q5_k_m"
SHARD_BYTES = 512 * 2**20

# Runs one export in this fresh process and prints its time and memory as JSON.
CHILD = textwrap.dedent(
    """
    import json, sys, time
    from llama_sft.cli import main

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    import gguf, llama_cpp, torch  # what export imports, loaded before the baseline
    from llama_sft.tools import export
    before = status("VmRSS")
    start = time.perf_counter()
    try:
        main(["export", *sys.argv[1:]])
    except SystemExit as exc:
        if exc.code:
            raise
    seconds = time.perf_counter() - start
    peak = status("VmHWM")
    print("RESULT " + json.dumps({"seconds": seconds, "peak_rss": peak, "growth": peak - before}))
    """
)


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    flags = (
        Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n")[0]
        if Path("/proc/cpuinfo").exists()
        else ""
    )
    strongest = next((f for f in ("amx_tile", "avx512_bf16", "avx512f", "avx2") if f" {f}" in flags), "")
    family = "xeon" if "Xeon" in cpu else "epyc" if "EPYC" in cpu else platform.machine()
    slug = {"amx_tile": "amx", "avx512_bf16": "avx512bf16", "avx512f": "avx512"}.get(strongest, strongest)
    return {"name": f"{family}-{slug}" if slug else family, "cpu": cpu, "cpus": os.cpu_count()}


def build_model(folder: Path, hidden: int, ffn: int, layers: int, heads: int) -> int:
    """Random float16 weights in Hugging Face's layout, in shards, without building the model."""
    import torch
    from safetensors.torch import save_file

    from llama_sft.data.tokenizer import TextTokenizer

    folder.mkdir(parents=True)
    tokenizer = TextTokenizer.load(TOKENIZER)
    tokenizer.save(folder)
    vocab = 55296
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        layer = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{layer}self_attn.{name}.weight"] = (hidden, hidden)
        shapes[f"{layer}mlp.gate_proj.weight"] = (ffn, hidden)
        shapes[f"{layer}mlp.up_proj.weight"] = (ffn, hidden)
        shapes[f"{layer}mlp.down_proj.weight"] = (hidden, ffn)
        shapes[f"{layer}input_layernorm.weight"] = (hidden,)
        shapes[f"{layer}post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    generator = torch.Generator().manual_seed(0)
    shards, shard, size = [], {}, 0
    for key, shape in shapes.items():
        if len(shape) == 1:
            shard[key] = torch.ones(shape, dtype=torch.float16)
        else:
            shard[key] = (torch.randn(shape, generator=generator) * 0.02).to(torch.float16)
        size += shard[key].numel() * 2
        if size >= SHARD_BYTES:
            shards.append(shard)
            shard, size = {}, 0
    if shard:
        shards.append(shard)
    weight_map, total, params = {}, 0, 0
    for number, tensors in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        for key, tensor in tensors.items():
            weight_map[key] = name
            total += tensor.numel() * 2
            params += tensor.numel()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return params


def run_export(base: Path, out: Path, outtype: str) -> dict:
    argv = ["--base_model", str(base), "--output_file", str(out), "--outtype", outtype, "--overwrite"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"export --outtype {outtype} failed:\n{done.stderr[-3000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def decode_speed(path: Path, tokens: int = 32) -> float:
    """llama.cpp's greedy decode speed, tokens/s after the first token."""
    from llama_sft.tools.export import load_gguf

    llm = load_gguf(path, n_ctx=256)
    try:
        prompt = llm.tokenize("把这个英文词翻译成中文：yellow".encode())
        stamps = []
        for _ in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
            stamps.append(time.perf_counter())
            if len(stamps) == tokens:
                break
    finally:
        llm.close()
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="hidden 256, 2 layers: a smoke test")
    parser.add_argument("--out", help="JSON file to write (default bench/results/DATE_MACHINE_export.json)")
    parser.add_argument("--outtypes", default=",".join(OUTTYPES), help="comma-separated, in this order")
    parser.add_argument(
        "--scratch", default=None, help="folder for the model and the files (default a temp dir)"
    )
    args = parser.parse_args()
    if not TOKENIZER.is_dir():
        raise SystemExit(f"{TOKENIZER}: Chinese-LLaMA-2's tokenizer is needed (../shared beside the project)")
    sizes = (
        dict(hidden=256, ffn=768, layers=2, heads=4)
        if args.quick
        else dict(hidden=2048, ffn=5632, layers=16, heads=16)
    )
    scratch = Path(tempfile.mkdtemp(prefix="export-bench-", dir=args.scratch))
    load_before = os.getloadavg()
    runs = []
    try:
        base = scratch / "base"
        start = time.perf_counter()
        params = build_model(base, **sizes)
        shards = sorted(base.glob("model-*.safetensors"))
        largest = max(p.stat().st_size for p in shards) / 2**20
        print(f"model: {params / 1e9:.2f} B parameters, {len(shards)} shards "
              f"(largest {largest:.0f} MiB), built in "
              f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
        for outtype in [*args.outtypes.split(","), LIST_FORM]:
            out = scratch / "out" / "model.gguf"
            out.parent.mkdir(exist_ok=True)
            try:
                numbers = run_export(base, out, outtype)
            except SystemExit as exc:
                # One failed type is recorded and the others still run.
                print(exc, flush=True)
                runs.append({"outtype": outtype, "error": str(exc)[-500:]})
                shutil.rmtree(out.parent, ignore_errors=True)
                continue
            files = sorted(out.parent.glob("*.gguf"))
            row = {
                "outtype": outtype,
                "seconds": round(numbers["seconds"], 2),
                "peak_rss_mib": round(numbers["peak_rss"] / 2**20),
                "growth_mib": round(numbers["growth"] / 2**20),
                "files": {},
            }
            for path in files:
                kind = path.stem.split(".")[-1] if "," in outtype else outtype
                entry = {"mib": round(path.stat().st_size / 2**20, 1)}
                if "," not in outtype:
                    entry["bits_per_weight"] = round(path.stat().st_size * 8 / params, 2)
                    entry["decode_tokens_per_s"] = round(decode_speed(path), 1)
                row["files"][kind] = entry
            print(json.dumps(row), flush=True)
            runs.append(row)
            shutil.rmtree(out.parent)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "benchmark": "export",
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": machine(),
        "model": {
            "parameters": params,
            **sizes,
            "vocab": 55296,
            "dtype": "float16",
            "weights": "random",
            "shards": len(shards),
            "largest_shard_mib": round(largest),
        },  # fmt: skip
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "runs": runs,
    }
    if load_before[0] > os.cpu_count():
        # Other jobs ran on the same cores: export times are longer and decode speeds lower than alone.
        result["note"] = (
            f"shared machine: load average {load_before[0]:.1f} on {os.cpu_count()} cores at the start"
        )
    name = f"{result['date']}_{result['machine']['name']}_export{'-quick' if args.quick else ''}.json"
    path = Path(args.out) if args.out else ROOT / "bench" / "results" / name
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
