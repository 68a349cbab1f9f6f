"""Training: `python -m crossvit_fast train` (and `torchrun ... -m crossvit_fast train`).

* `cli` — options and `main(argv) -> exit code`;
* `trainer` — the run: data, model (DDP / FSDP2 / compile / AMP / grad checkpointing), the loop,
  evaluation, metrics;
* `optim` — AdamW param groups (no decay on `no_weight_decay()` and 1-D params), warm-up + cosine;
* `state` — atomic, exactly-resumable checkpoints (`torch.load(weights_only=True)`);
* `dist` — torchrun environment, process group, DDP / FSDP2 wrapping.

tqdm, Pillow and scikit-learn (the `train` extra) are imported only when a run needs them.
"""

from .cli import DEFAULT_CONFIG, main, parse_args

__all__ = ["DEFAULT_CONFIG", "main", "parse_args"]
