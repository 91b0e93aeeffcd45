"""GPU benchmarks of the regressor, one command each on a GPU machine (torch, transformers, peft only).

    python bench/bench_gpu.py llama8b                  # Llama-3-8B architecture, bf16, the gpu profile's shape
    python bench/bench_gpu.py llama8b --former         # the former gpu profile's shape (LoRA r=16, head 1024-256)
    python bench/bench_gpu.py llama8b --grad-ckpt      # the same with activation checkpointing
    python bench/bench_gpu.py llama8b --ckpt-layers 8  # checkpointing in the first 8 of 32 layers only
    python bench/bench_gpu.py llama8b --compile        # the regressor under torch.compile
    python bench/bench_gpu.py smollm2 --data DATA_DIR  # SmolLM2-135M on the full train split
    python bench/bench_gpu.py llama8b --tiny           # CPU smoke test of the same code path
    python bench/bench_gpu.py curve --data DATA_DIR    # the gpu profile's learning curve, the LLM's half
    python bench/bench_gpu.py pack --data DATA_DIR --to .devdata  # what `curve` reads, small enough to carry

llama8b: the Llama-3-8B architecture from its config (random bf16 weights: throughput does not depend on
the values; no download), the `gpu` profile's adapters and head (LoRA r=32 on every projection of every
layer, the 256-wide head on the feature probe's 16 readouts; `--former`: the LoRA r=16 and 1024-256 head
on the pooled state that session x measured), prompts of our length (256 tokens, the embedded
tokenizer's mean is 248; Llama 3's tokenizer writes numbers in fewer tokens), MSE on the forecast (the
profile's IC loss and probe are a few hundred FLOPs per row, nothing next to the backbone), AdamW.
Reports tokens/s, MFU = tokens/s x 4 x non-embedding parameters / bf16 peak (forward 2N + backward to
the activations 2N; the frozen weights take no gradient), and peak GPU memory.
Targets on an H100: MFU >= 40%, peak memory <= 40 GB. The routes at them (one H200 measured 32.6% and
43.8 GB at batch 16, 21.1% and 18.1 GB with checkpointing in every layer): `--batch` (more tokens per
small LoRA matmul), `--ckpt-layers K` (recompute only the first K layers' activations: each layer holds
about 0.8 GB at 16 x 256, so K = 8 should cut about 6 GB for a quarter of the full recompute's cost),
`--compile` (torch.compile of the whole regressor: fuses the adapters' scale-and-add and the norms).

smollm2: `modeling.train` with the gpu profile on every train row of DATA_DIR's prompt corpus rendered
for SmolLM2 (build it with `BASE_MODEL=smollm2-135m-instruct make demo` or the `prompt_corpus` asset),
then validation and test RankIC on every date. Needs pandas and pyarrow besides torch.

curve: the `gpu` profile's runs of `bench_regressor.py curve --profile gpu` (24k rows over 3 seeds, 96k
and every train row over one; every validation and test date scored on the GPU), written in that
bench's cache format to $OUT/curve-gpu (a file per run, copied there as each finishes). It needs
DATA_DIR's backbone, prompt corpus and the training set's train-split features (the probe's targets),
not the baselines: copy the records to bench/runs/curve-gpu/ on a machine with `make demo`'s DATA_DIR
and run the command it prints after each run (`follow_up_command`, e.g. `python bench/bench_regressor.py
curve --profile gpu --epochs 2 --sizes 24000,96000 --seeds 1`: the profile's passes, or the records'
cache keys differ and the CPU trains them again) there, which fits ridge and the feature MLP into them and
writes the table, the plot and the paired stats. `--override 'learning_rate=2e-4'` trains a candidate gpu
profile (the same option of `bench_regressor.py curve --profile gpu` then pairs it with the profile's own
runs).

pack: DATA_DIR's backbone, its prompt corpus rewritten as one zstd-19 row group (46 -> 31 MB on the
default market) and the train split's 16 features as float32 (what the probe's targets are made of,
cast back to float32 there anyway): about 62 MB, under the device tool's 64 MiB. `bench/gpu_session.sh`
runs the whole GPU session over such a folder.

Results are printed as a BENCHMARKS.md section and saved as JSON under $OUT (or bench/out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}
"""Dense bf16 tensor-core peaks (TFLOP/s) by GPU name (SXM parts)."""

LLAMA3_8B = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
TINY = {
    **LLAMA3_8B,
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def _out_dir() -> Path:
    out = Path(os.environ.get("OUT") or ROOT / "bench" / "out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def bench_llama8b(args: argparse.Namespace) -> dict:
    from dataclasses import replace

    import torch
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaModel

    from modeling.model import (
        HeadConfig,
        LLMRegressor,
        LoraSettings,
        RegressionHead,
        enable_checkpointing,
    )
    from modeling.profiles import PROFILES

    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    config = LlamaConfig(**(TINY if args.tiny else LLAMA3_8B))
    config._attn_implementation = "sdpa"
    with torch.device(device):
        backbone = LlamaModel(config).to(dtype)
    backbone.config.use_cache = False
    backbone.requires_grad_(False)
    n_nonembedding = sum(p.numel() for n, p in backbone.named_parameters() if "embed_tokens" not in n)
    checkpointing = args.grad_ckpt or args.ckpt_layers > 0
    if checkpointing:  # --ckpt-layers K: the first K layers only (0 with --grad-ckpt: every layer)
        enable_checkpointing(backbone, args.ckpt_layers or None)
    checkpointed = sum(bool(getattr(layer, "gradient_checkpointing", False)) for layer in backbone.layers)
    settings = replace(
        PROFILES["gpu"].regressor,  # the shipped shape; --former: the one session x's rows measured
        **(
            {"lora": LoraSettings(r=16, alpha=32.0), "head": HeadConfig(hidden_sizes=(1024, 256))}
            if args.former
            else {}
        ),
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_layers=args.ckpt_layers or None,
    )
    peft_model = get_peft_model(backbone, settings.lora.peft_config(backbone))
    model = LLMRegressor(
        peft_model, RegressionHead(config.hidden_size, settings.head).to(device), settings, {}
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=cuda)
    forward = torch.compile(model) if args.compile else model  # compiled on the first (warm-up) step
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=generator).to(device)
    mask = torch.ones_like(ids)
    target = torch.randn(args.batch, generator=generator).to(device)

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = ((forward(ids, mask) - target) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    tokens_per_s = args.steps * args.batch * args.seq / wall
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in gpu), args.peak_tflops)
    mfu = tokens_per_s * 4 * n_nonembedding / (peak * 1e12) if peak else float("nan")
    memory = torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")
    return {
        "gpu": gpu,
        "lora_r": settings.lora.r,
        "lora_layers": len(model.lora_layers()),
        "head": list(settings.head.hidden_sizes),
        "head_feature_bottleneck": settings.head.feature_bottleneck,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "batch": args.batch,
        "seq": args.seq,
        "grad_ckpt": args.grad_ckpt,
        "checkpointed_layers": checkpointed,
        "layers": len(backbone.layers),
        "compile": args.compile,
        "non_embedding_params": n_nonembedding,
        "tokens_per_s": tokens_per_s,
        "samples_per_s": tokens_per_s / args.seq,
        "mfu": mfu,
        "peak_memory_gb": memory,
        "bf16_peak_tflops": peak,
        "tiny": args.tiny,
    }


def bench_smollm2(args: argparse.Namespace) -> dict:
    import torch

    from modeling.backbones import SMOLLM2_NAME
    from modeling.backbones.common import load_tokenizer
    from modeling.data.corpus import read_corpus_split, tokenise_rows
    from modeling.inference import predict_ids
    from modeling.metrics import evaluate
    from modeling.model import load_regressor
    from modeling.profiles import PROFILES
    from modeling.prompt import PromptBuilder
    from modeling.train import TrainJob, train_regressor

    data = Path(args.data).resolve()
    base, corpus = data / "models" / SMOLLM2_NAME, data / "prompt_corpus.parquet"
    profile = PROFILES["gpu"]
    job = TrainJob(
        str(base),
        str(corpus),
        str(_out_dir() / "smollm2_full"),
        PromptBuilder().settings(),
        profile.regressor,
        profile.train,
        resume=True,
        training_set_path=str(data / "training_set.parquet"),  # the probe's feature values
    )
    started = time.perf_counter()
    result = train_regressor(job)
    wall = time.perf_counter() - started
    tok = load_tokenizer(base)
    model = load_regressor(result.model_dir, device="cuda" if torch.cuda.is_available() else None)
    scores = {}
    for split in ("validation", "test"):
        rows = read_corpus_split(corpus, split)
        tokenised = tokenise_rows(rows, tok)
        frame = tokenised.frame.assign(
            label=tokenised.label, prediction=predict_ids(model, tok, tokenised.ids, 256)
        )
        scores[split] = evaluate(frame, ret=None)
    return {
        "wall_s": wall,
        "train": result.report(),
        "rank_ic": {s: v["rank_ic"] for s, v in scores.items()},
        "rank_icir": {s: v["rank_icir"] for s, v in scores.items()},
    }


def bench_curve(args: argparse.Namespace) -> dict:
    import shutil

    import torch

    os.environ["DATA_DIR"] = str(Path(args.data).resolve())  # read by bench_regressor at import
    import bench_regressor as curve

    from modeling.evaluation import split_rows
    from modeling.profiles import PROFILES

    if args.override:  # a candidate gpu profile: its runs get their own cache keys
        curve.override_profile(args.override, "gpu")
    base, corpus, _ = curve._paths()
    frames = {}
    for split in ("validation", "test"):
        rows = split_rows(corpus, split, None)
        frames[split] = rows[rows["date"].isin(sorted(rows["date"].unique())[:: args.date_step])].reset_index(
            drop=True
        )
    sizes = [None if x == "all" else int(x) for x in args.sizes.split(",")]
    # one seed of every size first, so that a run cut short still has the whole curve
    plan = [(size, 0) for size in sizes] + [
        (size, seed) for seed in range(1, args.seeds) for size in sizes if size is not None and size <= 24_000
    ]
    work = Path(args.work) if args.work else _out_dir() / "curve-gpu-work"
    # $OUT/curve-gpu on a GPU machine; bench/runs/curve-gpu, where the curve reads them, here
    dest = curve.records_dir(
        _out_dir() / ("curve-gpu" if args.date_step == 1 else f"curve-every{args.date_step}-gpu")
    )
    dest.mkdir(parents=True, exist_ok=True)
    done = []
    for size, seed in plan:
        print(f"curve (gpu profile): {size or 'all'} rows, seed {seed}", flush=True)
        started = time.perf_counter()
        record = curve.curve_run(
            base,
            corpus,
            None,
            frames,
            size,
            seed,
            work,
            "gpu",
            epochs=PROFILES["gpu"].train.epochs,
            baselines=False,
            score_batch=PROFILES["gpu"].train.eval_batch_size,
        )
        for path in curve.records_dir(work).glob(f"{size or 'all'}-seed{seed}-*.json"):
            shutil.copy(path, dest / path.name)
        rates = record["score_rows_per_s"]
        print(
            f"  {time.perf_counter() - started:.0f} s: train {record['train_s']} s, "
            f"{record['report'].get('samples_per_s')} samples/s; scoring {rates} rows/s",
            flush=True,
        )
        done.append({"size": size, "seed": seed, "train_s": record["train_s"], "score_rows_per_s": rates})
        print(f"  then: {follow_up_command(done, args)}", flush=True)  # after each run: a cut session has it
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": device, "runs": done, "follow_up": follow_up_command(done, args)}


def follow_up_command(done: list[dict], args: argparse.Namespace) -> str:
    """The command that, on a machine with `make demo`'s DATA_DIR and these records copied to
    bench/runs/, finds them (the same cache keys: the gpu profile's passes, the date step, the candidate)
    and fits ridge and the feature MLP into them: the sizes and seeds that finished, nothing retrained."""
    import shlex

    from modeling.profiles import PROFILES

    sizes = list(dict.fromkeys(d["size"] for d in done))
    # `--seeds` goes to every size up to 24k rows (bench_regressor's --multi-seed-max), the others get one:
    # the fewest any of those finished, so a session cut between seeds asks for nothing it lacks
    small = [sum(d["size"] == size for d in done) for size in sizes if size is not None and size <= 24_000]
    seeds = min(small, default=1)
    command = (
        f"python bench/bench_regressor.py curve --profile gpu --epochs {PROFILES['gpu'].train.epochs} "
        f"--sizes {','.join(str(size or 'all') for size in sizes)} --seeds {seeds}"
    )
    if args.date_step != 1:
        command += f" --date-step {args.date_step}"
    if args.override:
        command += f" --override {shlex.quote(args.override)}"
    return command


def pack(args: argparse.Namespace) -> dict:
    import shutil

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from modeling.feature_registry import FEATURE_NAMES

    data, to = Path(args.data).resolve(), Path(args.to).resolve()
    (to / "models").mkdir(parents=True, exist_ok=True)
    shutil.copytree(data / "models" / "base_model", to / "models" / "base_model", dirs_exist_ok=True)
    corpus = pq.read_table(data / "prompt_corpus.parquet")  # its schema metadata (the prompt settings) kept
    pq.write_table(
        corpus,
        to / "prompt_corpus.parquet",
        compression="zstd",
        compression_level=19,
        row_group_size=len(corpus),
        data_page_size=512 << 20,
    )
    columns = ["date", "symbol", "split", *FEATURE_NAMES]
    features = pq.read_table(data / "training_set.parquet", columns=columns)
    features = features.filter(pc.equal(features["split"], "train")).drop(["split"])
    floats = [pa.field(n, pa.float32()) for n in FEATURE_NAMES]
    features = features.cast(
        pa.schema([features.schema.field("date"), pa.field("symbol", pa.string()), *floats])
    )
    pq.write_table(features, to / "training_set.parquet", compression="zstd", compression_level=19)
    sizes = {p.name: p.stat().st_size for p in to.rglob("*") if p.is_file()}
    print(
        f"{to}: {sum(sizes.values()) / 2**20:.1f} MiB ({len(corpus):,} prompts, {len(features):,} train rows)"
    )
    return {"to": str(to), "bytes": sizes}


def _flags(args: argparse.Namespace) -> str:
    """The llama8b command's options that change what is measured, as typed."""
    flags = "" if args.batch == 16 else f" --batch {args.batch}"
    flags += (
        " --grad-ckpt" if args.grad_ckpt else f" --ckpt-layers {args.ckpt_layers}" if args.ckpt_layers else ""
    )
    return flags + (" --compile" if args.compile else "") + (" --former" if args.former else "")


def _variant(args: argparse.Namespace) -> str:
    """The result file's suffix: one file per measured variant ('_ckpt' kept for every layer checkpointed)."""
    suffix = f"_b{args.batch}" if args.batch != 16 else ""
    suffix += "_ckpt" if args.grad_ckpt else f"_ckpt{args.ckpt_layers}" if args.ckpt_layers else ""
    return suffix + ("_compile" if args.compile else "") + ("_former" if args.former else "")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["llama8b", "smollm2", "curve", "pack"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--grad-ckpt", action="store_true", help="llama8b: checkpointing in every layer")
    parser.add_argument(
        "--ckpt-layers", type=int, default=0, help="llama8b: checkpointing in the first K layers only"
    )
    parser.add_argument("--compile", action="store_true", help="llama8b: torch.compile the regressor")
    parser.add_argument("--tiny", action="store_true", help="tiny config on the CPU: a smoke test")
    parser.add_argument(
        "--former",
        action="store_true",
        help="llama8b: the former gpu profile's LoRA r=16 and 1024-256 head (session x's rows), not the current",
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak when the GPU is not known")
    parser.add_argument("--data", default=os.environ.get("DATA_DIR", "data"))
    parser.add_argument("--sizes", default="24000,96000,all", help="curve: train sizes ('all' = every row)")
    parser.add_argument("--seeds", type=int, default=3, help="curve: seeds at sizes up to 24k")
    parser.add_argument("--date-step", type=int, default=1, help="curve: every n-th date (1 = every date)")
    parser.add_argument("--work", default="", help="curve: where runs train (default under $OUT)")
    parser.add_argument("--to", default=".devdata", help="pack: the folder to write")
    parser.add_argument(
        "--override",
        default="",
        help="curve: a candidate gpu profile, e.g. 'learning_rate=2e-4' (JSON values)",
    )
    args = parser.parse_args()
    runners = {"llama8b": bench_llama8b, "smollm2": bench_smollm2, "curve": bench_curve, "pack": pack}
    result = runners[args.what](args)
    name = f"gpu_{args.what}{_variant(args) if args.what == 'llama8b' else ''}"
    (_out_dir() / f"{name}.json").write_text(json.dumps(result, indent=1, default=float))
    if args.what == "llama8b":
        r = result
        shape = f"LoRA r={r['lora_r']}, head {'-'.join(map(str, r['head']))}" + (
            f" on {r['head_feature_bottleneck']} readouts" if r["head_feature_bottleneck"] else ""
        )
        print(f"""## GPU: Llama-3-8B architecture, {shape} (issue 8)

Command: `python bench/bench_gpu.py llama8b{_flags(args)}` on {r["gpu"]}.

| batch x seq | checkpointed layers | compiled | tokens/s | samples/s | MFU (4N, bf16 peak {r["bf16_peak_tflops"]} TFLOP/s) | peak memory GB |
|---|---:|---|---:|---:|---:|---:|
| {r["batch"]} x {r["seq"]} | {r["checkpointed_layers"]} of {r["layers"]} | {"yes" if r["compile"] else "no"} | {r["tokens_per_s"]:,.0f} | {r["samples_per_s"]:.1f} | {r["mfu"]:.1%} | {r["peak_memory_gb"]:.1f} |
""")
    else:
        print(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    main()
