"""Pretrain fedtorch's GPT centrally on half of Shakespeare's plays, for the federated
fine-tuning study that starts from it (``init_from``).

The 37 plays, sorted by name, are split alternately: even positions (alls_well..., as_you...)
pretrain here, odd positions are the federated clients' plays. Training is plain AdamW with
a cosine schedule over random 80-character sequences of the pretraining plays' training
split; the held-out split of the same plays is evaluated every ``--eval-every`` steps.

Resumable: the state (weights, optimizer, step, RNG) is saved every ``--save-every`` steps
to ``OUT.partial.pt`` and picked up by the next invocation with the same arguments.

    python experiments/llm/pretrain.py --steps 3000                    # results/pretrained/
    python experiments/llm/pretrain.py --steps 20 --data-root DIR --out /tmp/p   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from fedtorch.data.shakespeare import find_texts, shakespeare
from fedtorch.models import GPT
from fedtorch.server.evaluation import evaluate

HERE = Path(__file__).resolve().parent


def split_plays(root: str) -> tuple[list[str], list[str]]:
    """(pretraining plays, federated plays): alternate positions of the sorted play names."""
    names = sorted(p.name[: -len("_gut.txt")] for p in find_texts(root))
    return names[0::2], names[1::2]


def model_args(args: argparse.Namespace) -> dict:
    return {
        "vocab_size": 90,
        "n_layer": args.n_layer,
        "n_head": args.n_head,
        "n_embd": args.n_embd,
        "block_size": 80,
        "dropout": 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32, help="sequences of 80 per step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--save-every", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "pretrained")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pretrain_plays, federated_plays = split_plays(args.data_root)
    data = shakespeare(root=args.data_root, plays=pretrain_plays)
    torch.manual_seed(args.seed)
    model = GPT(**model_args(args))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / "partial.pt"
    step, history, gen = 0, [], torch.Generator().manual_seed(args.seed)
    if partial.exists():
        state = torch.load(partial, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        gen.set_state(state["generator"])
        step, history = state["step"], state["history"]
        print(f"resuming at step {step}", flush=True)
    tokens, train_s = 0, 0.0
    while step < args.steps:
        t0 = time.perf_counter()
        model.train()
        batch = torch.randint(len(data.train_x), (args.batch,), generator=gen)
        x, y = data.train_x[batch], data.train_y[batch]
        loss, count = data.task.loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        tokens += int(count)
        train_s += time.perf_counter() - t0
        if step % args.eval_every == 0 or step == args.steps:
            test_loss, test_acc = evaluate(model, data.test_x, data.test_y, 512, data.task)
            rate = tokens / train_s  # training only, evaluation left out
            history.append(
                {
                    "step": step,
                    "train_loss": float(loss.detach()),
                    "test_loss": test_loss,
                    "test_accuracy": test_acc,
                    "tokens_per_s": rate,
                }
            )
            print(json.dumps(history[-1]), flush=True)
        if step % args.save_every == 0 and step < args.steps:
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "generator": gen.get_state(),
                    "step": step,
                    "history": history,
                },
                partial,
            )
    torch.save(model.state_dict(), args.out / "model.pt")
    summary = {
        "pretrain_plays": pretrain_plays,
        "federated_plays": federated_plays,
        "model": model_args(args),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "train_sequences": len(data.train_x),
        "history": history,
    }
    (args.out / "pretrain.json").write_text(json.dumps(summary, indent=2) + "\n")
    partial.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
