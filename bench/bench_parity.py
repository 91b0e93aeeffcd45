"""Benchmark: does a refactor change what training computes? The same small job trained by this tree and
by another git revision, compared bit for bit.

    python bench/bench_parity.py --against <git rev>     # after `make demo` (uses bench/out/demo_data)

Each side trains the demo's cpu recipe on 384 sampled rows (12 steps, EMA on, validation every 6 steps
on 2 dates) from the same corpus and base model, in its own process with its own `modeling` on the path.
The validation history and a hash of the saved head must match exactly.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import OUT, ROOT, write_section

COMMAND = "python bench/bench_parity.py --against"

CHILD = """
import hashlib, json, sys
from pathlib import Path
from modeling.data.parquet_io import read_parquet_metadata
from modeling.profiles import PROFILES, apply_overrides
from modeling.prompt import PromptBuilder
from modeling.train import TrainJob, train_regressor

data, out = Path(sys.argv[1]), Path(sys.argv[2])
corpus = data / "prompt_corpus.parquet"
prompt = PromptBuilder.of_corpus(read_parquet_metadata(corpus)).settings()
profile = PROFILES["cpu"]
overrides = {"max_train_samples": 384, "batch_size": 32, "eval_every_steps": 6, "eval_max_dates": 2,
             "time_budget_s": None, "ema_decay": 0.9}
regressor, train = apply_overrides(profile.regressor, profile.train, overrides)
job = TrainJob(str(data / "models" / "base_model"), str(corpus), str(out), prompt, regressor, train,
               resume=False, training_set_path=str(data / "training_set.parquet"))
result = train_regressor(job, log=lambda message: None)
head = hashlib.sha256((out / "model" / "head.safetensors").read_bytes()).hexdigest()[:16]
history = [[r["step"], r["val_rank_ic"], r["train_loss"]] for r in result.state.history]
print("PARITY " + json.dumps({"history": history, "head": head}))
"""


def _train(tree: Path, data: Path, out: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(data), str(out)],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
        capture_output=True,
        text=True,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("PARITY ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"training in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("PARITY ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", required=True, help="the git revision to compare with")
    parser.add_argument("--data-dir", default=str(OUT / "demo_data"))
    args = parser.parse_args()
    data = Path(args.data_dir).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        other = Path(tmp) / "tree"
        subprocess.run(
            ["git", "worktree", "add", "-f", "--detach", str(other), args.against],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        try:
            theirs = _train(other, data, Path(tmp) / "theirs")
            ours = _train(ROOT, data, Path(tmp) / "ours")
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(other)], cwd=ROOT, capture_output=True
            )
    same = theirs == ours
    rev = subprocess.run(
        ["git", "rev-parse", "--short", args.against], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    rows = "\n".join(
        f"| {a[0]} | {a[1]:.10f} | {b[1]:.10f} | {a[2]:.10f} | {b[2]:.10f} |"
        for a, b in zip(theirs["history"], ours["history"], strict=True)
    )
    write_section(
        "parity",
        f"""## Refactor parity (issue 15)

Command: `{COMMAND} {rev}` after `make demo`. The demo's cpu recipe on 384 sampled train rows (12 steps,
EMA 0.9, validation every 6 steps on 2 dates), trained by revision `{rev}` and by this tree from the same
corpus, base model and seed. **{"Identical" if same else "DIFFERENT"}**: head weights hash {theirs["head"]} vs
{ours["head"]}.

| step | val RankIC ({rev}) | val RankIC (this tree) | train loss ({rev}) | train loss (this tree) |
|---:|---:|---:|---:|---:|
{rows}
""",
    )
    print(json.dumps({"against": rev, "identical": same, "theirs": theirs, "ours": ours}))
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
