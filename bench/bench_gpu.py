"""GPU benchmarks of the regressor, one command each on a GPU machine (torch, transformers, peft only).

    python bench/bench_gpu.py llama8b                  # Llama-3-8B architecture, bf16, LoRA r=16
    python bench/bench_gpu.py llama8b --grad-ckpt      # the same with activation checkpointing
    python bench/bench_gpu.py smollm2 --data DATA_DIR  # SmolLM2-135M on the full train split
    python bench/bench_gpu.py llama8b --tiny           # CPU smoke test of the same code path

llama8b: the Llama-3-8B architecture from its config (random bf16 weights: throughput does not depend on
the values; no download), LoRA r=16 on every linear layer, the MLP head, prompts of our length (256
tokens, the embedded tokenizer's mean is 248; Llama 3's tokenizer writes numbers in fewer tokens),
AdamW. Reports tokens/s, MFU = tokens/s x 4 x non-embedding parameters / bf16 peak (forward 2N +
backward to the activations 2N; the frozen weights take no gradient), and peak GPU memory.
Targets on an H100: MFU >= 40%, peak memory <= 40 GB.

smollm2: `modeling.train` with the gpu profile on every train row of DATA_DIR's prompt corpus rendered
for SmolLM2 (build it with `BASE_MODEL=smollm2-135m-instruct make demo` or the `prompt_corpus` asset),
then validation and test RankIC on every date. Needs pandas and pyarrow besides torch.

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
    import torch
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaModel

    from modeling.model import HeadConfig, LLMRegressor, LoraSettings, RegressionHead, RegressorConfig

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
    if args.grad_ckpt:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    settings = RegressorConfig(
        lora=LoraSettings(r=16, alpha=32.0),
        head=HeadConfig(hidden_sizes=(1024, 256)),
        gradient_checkpointing=args.grad_ckpt,
    )
    peft_model = get_peft_model(backbone, settings.lora.peft_config(backbone))
    model = LLMRegressor(
        peft_model, RegressionHead(config.hidden_size, settings.head).to(device), settings, {}
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=cuda)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=generator).to(device)
    mask = torch.ones_like(ids)
    target = torch.randn(args.batch, generator=generator).to(device)

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = ((model(ids, mask) - target) ** 2).mean()
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
        "batch": args.batch,
        "seq": args.seq,
        "grad_ckpt": args.grad_ckpt,
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["llama8b", "smollm2"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--grad-ckpt", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="tiny config on the CPU: a smoke test")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak when the GPU is not known")
    parser.add_argument("--data", default=os.environ.get("DATA_DIR", "data"))
    args = parser.parse_args()
    result = bench_llama8b(args) if args.what == "llama8b" else bench_smollm2(args)
    (_out_dir() / f"gpu_{args.what}.json").write_text(json.dumps(result, indent=1, default=float))
    if args.what == "llama8b":
        r = result
        print(f"""## GPU: Llama-3-8B architecture, LoRA r=16 (issue 8)

Command: `python bench/bench_gpu.py llama8b{" --grad-ckpt" if r["grad_ckpt"] else ""}` on {r["gpu"]}.

| batch x seq | tokens/s | samples/s | MFU (4N, bf16 peak {r["bf16_peak_tflops"]} TFLOP/s) | peak memory GB |
|---|---:|---:|---:|---:|
| {r["batch"]} x {r["seq"]} | {r["tokens_per_s"]:,.0f} | {r["samples_per_s"]:.1f} | {r["mfu"]:.1%} | {r["peak_memory_gb"]:.1f} |
""")
    else:
        print(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    main()
