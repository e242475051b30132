"""Train a tiny character-level GPT twice: with torch.nn norms, then after ``fusednorm.replace_norms``.

Both runs start from the same weights and see the same batches, so their loss curves should agree to
rounding; the script prints both curves side by side and the tokens/s of each run.

    python examples/train_tiny_gpt.py                      # CPU, 300 steps
    python examples/train_tiny_gpt.py --device cuda --compile --backend triton --steps 500

The corpus is ``examples/data/tiny_corpus.txt`` (a few KB of plain English written for this repo). The model
is built from plain torch modules; tests import ``GPTConfig``, ``build_model``, ``load_corpus`` and ``train``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fusednorm

CORPUS = Path(__file__).resolve().parent / "data" / "tiny_corpus.txt"


@dataclasses.dataclass
class GPTConfig:
    """Model size. norm: ``"layernorm"`` (GPT-2 style, with bias) or ``"rmsnorm"`` (Llama style)."""

    vocab_size: int = 64
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    norm: str = "layernorm"


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "layernorm":
        return nn.LayerNorm(config.n_embd)
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=1e-6)
    raise ValueError(f"unknown norm {config.norm!r}; expected 'layernorm' or 'rmsnorm'")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = nn.Sequential(
            nn.Linear(config.n_embd, 4 * config.n_embd), nn.GELU(), nn.Linear(4 * config.n_embd, config.n_embd)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """idx: (B, T) int64 token ids, T <= block_size. Returns logits (B, T, vocab) and the mean CE loss."""
        t = idx.shape[1]
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss


def build_model(config: GPTConfig, seed: int = 0) -> GPT:
    """A GPT with deterministic initial weights; norm weights/biases randomised too (not ones/zeros), so a
    wrong affine in a replacement norm shows up from the first step."""
    gen = torch.Generator().manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02 * (2 if "emb" in name else 1))
            elif ".ln_" in name or name.startswith("ln_"):
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.zero_()
    return model


def load_corpus(path: Path = CORPUS, vocab_size: int | None = None) -> tuple[Tensor, list[str]]:
    """The corpus as int64 character ids (1-D) and the vocabulary (sorted characters)."""
    text = path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    if vocab_size is not None and len(chars) > vocab_size:
        raise ValueError(f"corpus has {len(chars)} distinct characters, more than vocab_size={vocab_size}")
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text], dtype=torch.long), chars


def get_batch(data: Tensor, batch_size: int, block_size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random windows (B, T) of the corpus and the next-character targets (B, T)."""
    starts = torch.randint(0, data.numel() - block_size - 1, (batch_size,), generator=gen)
    x = torch.stack([data[s : s + block_size] for s in starts.tolist()])
    y = torch.stack([data[s + 1 : s + 1 + block_size] for s in starts.tolist()])
    return x, y


@dataclasses.dataclass
class TrainResult:
    losses: list[float]
    tokens_per_s: float


def train(
    model: nn.Module,
    data: Tensor,
    steps: int,
    *,
    batch_size: int = 16,
    block_size: int | None = None,
    lr: float = 3e-3,
    device: str | torch.device = "cpu",
    seed: int = 1,
    compile: bool = False,
    warmup_steps: int = 3,
) -> TrainResult:
    """AdamW for ``steps`` steps on random windows of ``data`` (same windows for the same seed).

    Returns the loss of every step and tokens/s measured after ``warmup_steps`` (compilation excluded).
    """
    device = torch.device(device)
    block_size = block_size or model.config.block_size
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    fwd = torch.compile(model) if compile else model
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    t0, timed_tokens = None, 0
    for step in range(steps):
        if step == min(warmup_steps, steps - 1):
            _sync(device)
            t0 = time.perf_counter()
            timed_tokens = 0
        x, y = get_batch(data, batch_size, block_size, gen)
        _, loss = fwd(x.to(device), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))  # syncs: the loss curve is the point of this script
        timed_tokens += x.numel()
    _sync(device)
    elapsed = time.perf_counter() - t0 if t0 is not None else float("nan")
    return TrainResult(losses, timed_tokens / elapsed if elapsed > 0 else float("nan"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--norm", choices=("layernorm", "rmsnorm"), default="layernorm")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--backend", default=None, choices=("auto", "triton", "native", "reference"),
                    help="fusednorm backend for the replaced norms (default: auto)")
    ap.add_argument("--print-every", type=int, default=25)
    args = ap.parse_args(argv)

    data, chars = load_corpus()
    config = GPTConfig(vocab_size=len(chars), norm=args.norm)
    base = build_model(config)
    fused = fusednorm.replace_norms(copy.deepcopy(base), backend=args.backend, verbose=True)
    if args.backend is not None and args.compile:
        # A per-module pin is a context variable, which compiled graphs do not see: set it process-wide.
        fusednorm.set_backend(args.backend)

    kw = dict(batch_size=args.batch_size, device=args.device, compile=args.compile)
    print(f"training torch.nn norms for {args.steps} steps on {args.device} ...")
    ref = train(base, data, args.steps, **kw)
    print("training fusednorm norms ...")
    new = train(fused, data, args.steps, **kw)

    print(f"\n{'step':>6} {'torch loss':>12} {'fusednorm loss':>15} {'diff':>10}")
    shown = sorted(set(range(0, args.steps, max(1, args.print_every))) | {args.steps - 1})
    for i in shown:
        print(f"{i:>6} {ref.losses[i]:>12.5f} {new.losses[i]:>15.5f} {new.losses[i] - ref.losses[i]:>10.2e}")
    worst = max(abs(a - b) for a, b in zip(ref.losses, new.losses, strict=True))
    print(f"\nmax |loss difference| over {args.steps} steps: {worst:.3e}")
    print(f"tokens/s  torch: {ref.tokens_per_s:,.0f}   fusednorm: {new.tokens_per_s:,.0f}   "
          f"ratio: {new.tokens_per_s / ref.tokens_per_s:.2f}x")
    print(f"final loss {new.losses[-1]:.3f} (uniform over {len(chars)} chars would be {math.log(len(chars)):.3f})")


if __name__ == "__main__":
    main()
