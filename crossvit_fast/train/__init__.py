"""Training: `python -m crossvit_fast train` (and `torchrun ... -m crossvit_fast train`), and
`eval` / `predict` / `export` on its checkpoints.

* `cli` — options and `main(argv) -> exit status`;
* `trainer` — the run: data, model (DDP / FSDP2 / compile / AMP / grad checkpointing / EMA), the
  loop, checkpoints;
* `meters` — autocast policy, evaluation sums, on-device training sums, the throughput clock;
* `models` — the default model, `--model` resolution, `--init` weights;
* `data`, `transforms`, `augment` — digits and ImageFolder data, per-image crops, mixup / cutmix;
* `optim` — AdamW param groups, warm-up + cosine, EMA;
* `state` — atomic, resumable checkpoints (`torch.load(weights_only=True)`), what a resume keeps,
  where a run's checkpoint lives (`run_paths`);
* `preempt` — SIGINT / SIGTERM at a step boundary, agreed over ranks;
* `logs` — stdout lines, `metrics.jsonl`, TensorBoard;
* `infer` — `eval`, `predict`, `export`;
* `dist` — torchrun environment, process group, DDP / FSDP2 wrapping.

tqdm, Pillow and scikit-learn (the `train` extra) are imported only when a run needs them.
"""

from .cli import main, parse_args
from .models import DEFAULT_CONFIG

__all__ = ["DEFAULT_CONFIG", "command", "main", "parse_args"]


def command(name: str, argv: list[str]) -> int:
    """`python -m crossvit_fast NAME ARGV...` for train, eval, predict and export."""
    if name == "train":
        return main(argv)
    from .infer import main as infer_main

    return infer_main(name, argv)
