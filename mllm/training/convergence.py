"""The seed's encoder-decoder convergence experiment: token accuracy of chunk reconstruction against steps.

``train_autoencoder`` trains a ``ChunkEncoder`` and a ``ChunkDecoder`` (:mod:`.autoencoder`) on
128-token chunks of the Python standard library's docstrings and writes a convergence table
(markdown), the rows (JSON) and a plot (PNG), with a checkpoint to resume from. As a command::

    mllm train autoencoder --out bench_results/autoencoder
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from .autoencoder import DECODERS, TOKENIZERS, ChunkDecoder, autoencode_loss, chunk_dataset, decode_loss, make_tokenizer
from .checkpoint import load_checkpoint, save_checkpoint


@dataclasses.dataclass
class AutoencoderConfig:
    """The convergence experiment. The defaults run in about 4 minutes on 2 shared CPU cores.

    The seed's setting scaled to a CPU: chunks of up to 128 MiniLM tokens, d_model 256 (the seed:
    512), 2 encoder and 2 decoder layers. ``decoder``: ``"causal"`` or ``"parallel"`` (see
    ``ChunkDecoder``). ``steps`` and ``eval_every`` may change when a run resumes (to train
    further); the rest may not. ``heldout`` is the fraction of chunks never trained on; accuracy
    is measured on ``eval_chunks`` of them and on as many training chunks, so the two curves are
    comparable and an evaluation stays cheap. ``max_chunks`` keeps the first chunks of the
    corpus (None: all). ``lr`` is reached after ``warmup`` steps and then held: a schedule that
    does not depend on ``steps`` lets a finished run be extended exactly.
    """

    d_model: int = 256
    encoder_layers: int = 2
    decoder_layers: int = 2
    heads: int = 4
    cls_heads: int = 4
    chunk_size: int = 128
    batch_size: int = 32
    steps: int = 400
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.01
    eval_every: int = 50
    heldout: float = 0.05
    eval_chunks: int = 192
    max_chunks: int | None = None
    seed: int = 0
    tokenizer: str = "minilm"
    decoder: str = "causal"
    token_dropout: float = 0.0

    def validate(self) -> None:
        positive = ("d_model", "encoder_layers", "decoder_layers", "heads", "cls_heads", "chunk_size", "batch_size")
        for name in positive + ("steps", "eval_every", "eval_chunks"):
            if getattr(self, name) < 1:
                raise ValueError(f"AutoencoderConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.heads:
            raise ValueError(f"AutoencoderConfig: d_model ({self.d_model}) must be divisible by heads ({self.heads})")
        if self.warmup < 0 or self.weight_decay < 0:
            raise ValueError("AutoencoderConfig: warmup and weight_decay must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"AutoencoderConfig: lr must be > 0, got {self.lr}")
        if not 0 < self.heldout < 1:
            raise ValueError(f"AutoencoderConfig: heldout must be in (0, 1), got {self.heldout}")
        if self.max_chunks is not None and self.max_chunks < 2:
            raise ValueError(f"AutoencoderConfig: max_chunks must be >= 2 or None, got {self.max_chunks}")
        if not 0 <= self.token_dropout < 1:
            raise ValueError(f"AutoencoderConfig: token_dropout must be in [0, 1), got {self.token_dropout}")
        if self.decoder not in DECODERS:
            raise ValueError(f"AutoencoderConfig: decoder must be one of {DECODERS}, got {self.decoder!r}")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"AutoencoderConfig: tokenizer must be one of {TOKENIZERS}, got {self.tokenizer!r}")


# Fields a resumed run may change: they decide how far and how often, not what is trained.
_RESUMABLE_CHANGES = ("steps", "eval_every")


def _lr_at(config: AutoencoderConfig, step: int) -> float:
    return config.lr * min(1.0, (step + 1) / max(config.warmup, 1))


def _epoch_batches(lengths: torch.Tensor, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """One epoch's batches (indices into ``lengths``), a pure function of (seed, epoch).

    Shuffled, then sorted by length within windows of 16 batches: a batch holds chunks of
    similar length and is trimmed to its longest, which saves most of the padding of a corpus of
    short docstrings while keeping batches random. Recomputable, so resuming needs no data state.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(lengths.numel(), generator=generator)
    window = 16 * batch_size
    order = torch.cat([part[torch.argsort(lengths[part], stable=True)] for part in order.split(window)])
    batches = list(order.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def _trimmed(ids: torch.Tensor, lengths: torch.Tensor, index: torch.Tensor):
    batch_lengths = lengths[index]
    return ids[index, : int(batch_lengths.max())], batch_lengths


@torch.no_grad()
def evaluate(encoder, decoder, ids, lengths, batch_size: int = 64, control: bool = False) -> dict:
    """Loss and token accuracy over all real tokens of ``ids [C, L]`` (weighted by tokens, not chunks).

    Returns ``{"loss", "acc"}``, and with ``control`` also ``"control_acc"``: the accuracy when each
    chunk is decoded from another chunk's embedding. What the decoder gets right without the
    right embedding (position and token statistics, and for a causal decoder the preceding
    tokens) shows there; ``acc - control_acc`` is what the embedding itself carries.
    """
    was_training = encoder.training, decoder.training
    encoder.eval(), decoder.eval()
    loss_sum = correct = control_correct = 0.0
    order = torch.argsort(lengths, stable=True)  # similar lengths together: less padding
    for index in order.split(batch_size):
        batch_ids, batch_lengths = _trimmed(ids, lengths, index)
        embedding = encoder(batch_ids, batch_lengths)
        loss, accuracy = decode_loss(decoder, embedding, batch_ids, batch_lengths)
        tokens = int(batch_lengths.sum())
        loss_sum += float(loss) * tokens
        correct += float(accuracy) * tokens
        if control:
            # The neighbour in length order: another chunk of about the same length.
            _, other = decode_loss(decoder, embedding.roll(1, 0), batch_ids, batch_lengths)
            control_correct += float(other) * tokens
    encoder.train(was_training[0]), decoder.train(was_training[1])
    total = int(lengths.sum())
    result = {"loss": loss_sum / total, "acc": correct / total}
    if control:
        result["control_acc"] = control_correct / total
    return result


class _Experiment:
    """Data, split, models and optimiser of one configuration (everything a checkpoint restores into)."""

    def __init__(self, config: AutoencoderConfig):
        from ..encoders import ChunkEncoder

        self.tokenizer = make_tokenizer(config.tokenizer)
        self.ids, self.lengths = chunk_dataset(self.tokenizer, config.chunk_size, config.max_chunks)
        count = self.ids.shape[0]
        if count < 2:
            raise ValueError(f"train_autoencoder: {count} chunk(s): need at least 2 (one trained, one held out)")
        split = torch.randperm(count, generator=torch.Generator().manual_seed(config.seed))
        held = min(max(1, round(count * config.heldout)), count - 1)
        self.heldout, self.train = split[:held], split[held:]
        # Accuracy is measured on (random) subsets of equal size: comparable curves, bounded cost.
        self.heldout_eval = self.heldout[: config.eval_chunks]
        self.train_eval = self.train[: self.heldout_eval.numel()]
        valid = torch.arange(config.chunk_size) < self.lengths[:, None]
        # Output classes: every token of the corpus (held-out included, so none is unpredictable).
        vocab = torch.unique(self.ids[valid])
        counts = torch.bincount(self.ids[self.train][valid[self.train]], minlength=self.tokenizer.vocab_size)
        self.baseline_token = int(counts.argmax())
        # On the very chunks the held-out accuracy is measured on.
        held_tokens = self.ids[self.heldout_eval][valid[self.heldout_eval]]
        self.baseline_acc = float((held_tokens == self.baseline_token).float().mean())

        torch.manual_seed(config.seed)
        self.encoder = ChunkEncoder.from_scratch(
            config.d_model, config.encoder_layers, config.heads, config.cls_heads, config.chunk_size, self.tokenizer
        )
        self.decoder = ChunkDecoder(
            self.tokenizer.vocab_size,
            config.d_model,
            config.decoder_layers,
            config.heads,
            config.chunk_size,
            config.decoder == "causal",
            vocab,
            config.token_dropout,
        )
        self.params = [*self.encoder.parameters(), *self.decoder.parameters()]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)

    def meta(self, config: AutoencoderConfig) -> dict:
        token = self.tokenizer.decode([self.baseline_token])
        return {
            "chunks": int(self.ids.shape[0]),
            "train_chunks": int(self.train.numel()),
            "heldout_chunks": int(self.heldout.numel()),
            "eval_chunks": int(self.heldout_eval.numel()),
            "tokens": int(self.lengths.sum()),
            "mean_chunk_tokens": round(float(self.lengths.float().mean()), 1),
            "classes": int(self.decoder.token_ids.numel()),
            "parameters": sum(p.numel() for p in self.params),
            "baseline_token": token,
            "baseline_acc": self.baseline_acc,
            "torch_threads": torch.get_num_threads(),
        }

    def examples(self, count: int = 3, chars: int = 300) -> list[dict]:
        """Held-out chunks and their reconstructions, as text (the seed's qualitative check)."""
        index = self.heldout[:count]
        self.encoder.eval(), self.decoder.eval()
        with torch.no_grad():
            ids, lengths = _trimmed(self.ids, self.lengths, index)
            decoded = self.decoder.decode(self.encoder(ids, lengths), lengths)
        self.encoder.train(), self.decoder.train()
        return [
            {
                "input": self.tokenizer.decode(row[: int(n)].tolist())[:chars],
                "output": self.tokenizer.decode(out)[:chars],
            }
            for row, n, out in zip(ids, lengths, decoded)
        ]


def _check_resumable(saved: dict, config: AutoencoderConfig, path: Path) -> None:
    current = dataclasses.asdict(config)
    changed = [k for k in current if k not in _RESUMABLE_CHANGES and saved.get(k) != current[k]]
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise ValueError(
            f"train_autoencoder: {path} was trained with another configuration ({details}); "
            "only steps and eval_every may change on resume. Use resume=False (--no-resume) or another out_dir."
        )


def train_autoencoder(config: AutoencoderConfig, *, out_dir, resume: bool = True, progress: bool = True) -> list[dict]:
    """Train encoder + decoder with ``autoencode_loss`` and record the convergence.

    Every ``eval_every`` steps (and at the last) appends a row ``{"step", "loss" (mean training
    loss since the previous row; at step 0 the loss on the training subset), "train_token_acc",
    "heldout_token_acc", "heldout_control_acc" (see ``evaluate``), "heldout_loss", "elapsed_s"}``,
    saves ``out_dir/checkpoint.pt`` (models, optimiser, step, RNG, rows) and rewrites
    ``convergence.json`` and ``convergence.md``; ``convergence.png`` is drawn at the end. With
    ``resume``, an existing checkpoint is continued (extended to a larger ``steps``, it gives the
    same losses as an uninterrupted run). Returns the rows.
    """
    config.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "checkpoint.pt"
    state = load_checkpoint(path) if resume else None
    if state is not None:
        _check_resumable(state["config"], config, path)
        if state["step"] > config.steps:
            raise ValueError(
                f"train_autoencoder: {path} is at step {state['step']}, past steps={config.steps}; "
                "ask for more steps or start afresh (resume=False)"
            )
    run = _Experiment(config)
    if state is not None:
        run.encoder.load_state_dict(state["encoder"])
        run.decoder.load_state_dict(state["decoder"])
        run.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step, rows, elapsed = state["step"], state["rows"], state["elapsed_s"]
    else:
        step, rows, elapsed = 0, [], 0.0

    def record(loss: float) -> None:
        held = evaluate(
            run.encoder, run.decoder, run.ids[run.heldout_eval], run.lengths[run.heldout_eval], control=True
        )
        train = evaluate(run.encoder, run.decoder, run.ids[run.train_eval], run.lengths[run.train_eval])
        rows.append(
            {
                "step": step,
                "loss": loss,
                "train_token_acc": train["acc"],
                "heldout_token_acc": held["acc"],
                "heldout_control_acc": held["control_acc"],
                "heldout_loss": held["loss"],
                "elapsed_s": round(elapsed + time.perf_counter() - start, 2),
            }
        )
        state = {
            "config": dataclasses.asdict(config),
            "encoder": run.encoder.state_dict(),
            "decoder": run.decoder.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "step": step,
            "rng": torch.get_rng_state(),
            "rows": rows,
            "elapsed_s": rows[-1]["elapsed_s"],
        }
        save_checkpoint(path, state)
        write_reports(rows, out_dir, config, run.meta(config), plot=False)

    from tqdm.auto import tqdm

    start = time.perf_counter()
    if not rows:
        record(evaluate(run.encoder, run.decoder, run.ids[run.train_eval], run.lengths[run.train_eval])["loss"])
    per_epoch = math.ceil(run.train.numel() / config.batch_size)
    plan, plan_epoch, losses = None, None, []
    with tqdm(total=config.steps, initial=step, desc="autoencoder", unit="step", disable=not progress) as bar:
        while step < config.steps:
            epoch, position = divmod(step, per_epoch)
            if plan_epoch != epoch:
                plan, plan_epoch = _epoch_batches(run.lengths[run.train], config.batch_size, config.seed, epoch), epoch
            ids, lengths = _trimmed(run.ids, run.lengths, run.train[plan[position]])
            for group in run.optimizer.param_groups:
                group["lr"] = _lr_at(config, step)
            loss, accuracy = autoencode_loss(run.encoder, run.decoder, ids, lengths)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # The usual guard for transformers: one odd batch cannot throw the weights far.
            torch.nn.utils.clip_grad_norm_(run.params, 1.0)
            run.optimizer.step()
            step += 1
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{float(accuracy):.3f}", refresh=False)
            bar.update(1)
            if step % config.eval_every == 0 or step == config.steps:
                record(sum(losses) / len(losses))
                losses = []
                bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}", heldout_acc=f"{rows[-1]['heldout_token_acc']:.3f}")
    write_reports(rows, out_dir, config, run.meta(config), examples=run.examples())
    return rows


_TOKEN_NAMES = {"minilm": "MiniLM WordPiece", "bytes": "byte"}


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def write_reports(rows: list[dict], out_dir, config: AutoencoderConfig, meta: dict, *, examples=(), plot=True) -> None:
    """``convergence.json`` (config, meta, rows), ``convergence.md`` (table) and, with ``plot``, ``convergence.png``."""
    out_dir = Path(out_dir)
    result = {"config": dataclasses.asdict(config), "meta": meta, "rows": rows, "examples": list(examples)}
    (out_dir / "convergence.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    baseline = f"always {meta['baseline_token']!r}: {_percent(meta['baseline_acc'])}"
    kind = "autoregressive (teacher-forced)" if config.decoder == "causal" else "non-autoregressive"
    lines = [
        "# Chunk autoencoder: convergence",
        "",
        (
            f"Each chunk of up to {config.chunk_size} {_TOKEN_NAMES[config.tokenizer]} tokens is rebuilt from its "
            f"{config.d_model}-dim chunk embedding (encoder: {config.encoder_layers} layer(s) + "
            f"{config.cls_heads}-head CLS readout; {kind} decoder: {config.decoder_layers} layer(s); "
            f"{meta['parameters']:,} parameters). "
            f"Corpus: stdlib docstrings, {meta['train_chunks']} training / {meta['heldout_chunks']} held-out chunks "
            f"({meta['mean_chunk_tokens']} tokens on average); batch {config.batch_size}, lr {config.lr}, "
            f"{meta['torch_threads']} CPU threads. Token accuracy: argmax over {meta['classes']} classes, on all real "
            f"tokens of {meta['eval_chunks']} held-out and as many training chunks. Control: those held-out "
            "chunks decoded from another chunk's embedding (what the decoder gets right without their own)."
        ),
        "",
        (
            f"| step | loss | train token acc | held-out token acc (baseline {baseline}) "
            "| held-out acc, control | held-out loss | elapsed |"
        ),
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['step']} | {r['loss']:.3f} | {_percent(r['train_token_acc'])} | {_percent(r['heldout_token_acc'])} "
        f"| {_percent(r['heldout_control_acc'])} | {r['heldout_loss']:.3f} | {r['elapsed_s']:.0f} s |"
        for r in rows
    ]
    if examples:
        lines += ["", "## Held-out chunks and their reconstructions", ""]
        for i, example in enumerate(examples):
            lines += [
                f"{i} input:  `{' '.join(example['input'].split())}`",
                "",
                f"{i} output: `{' '.join(example['output'].split())}`",
                "",
            ]
    (out_dir / "convergence.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if plot:
        _plot(rows, out_dir / "convergence.png", config, meta)


def _plot(rows: list[dict], path: Path, config: AutoencoderConfig, meta: dict) -> None:
    # The object API with the Agg canvas: no pyplot, so no global backend is switched under the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.2), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    steps = [r["step"] for r in rows]
    axes.plot(steps, [r["train_token_acc"] for r in rows], marker="o", markersize=3, label="train")
    axes.plot(steps, [r["heldout_token_acc"] for r in rows], marker="o", markersize=3, label="held-out")
    axes.plot(
        steps,
        [r["heldout_control_acc"] for r in rows],
        linestyle=":",
        label="held-out, decoded from another chunk's embedding",
    )
    axes.axhline(
        meta["baseline_acc"], color="grey", linestyle="--", label=f"baseline: always {meta['baseline_token']!r}"
    )
    axes.set_xlabel("step")
    axes.set_ylabel("token accuracy")
    # Room above the highest curve, not a fixed [0, 1]: early curves stay readable.
    top = max([meta["baseline_acc"]] + [max(r["train_token_acc"], r["heldout_token_acc"]) for r in rows])
    axes.set_ylim(0, min(1.0, 1.25 * top + 0.02))
    axes.grid(alpha=0.3)
    axes.legend()
    axes.set_title(
        f"Chunk autoencoder ({config.decoder} decoder): {config.chunk_size} {config.tokenizer} tokens, "
        f"d_model={config.d_model}",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path)


def add_arguments(parser) -> None:
    defaults = AutoencoderConfig()
    parser.add_argument("--out", default="bench_results/autoencoder", help="checkpoint and report directory")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default=defaults.tokenizer)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--d-model", type=int, default=defaults.d_model)
    parser.add_argument("--encoder-layers", type=int, default=defaults.encoder_layers)
    parser.add_argument("--decoder-layers", type=int, default=defaults.decoder_layers)
    parser.add_argument("--heads", type=int, default=defaults.heads)
    parser.add_argument("--cls-heads", type=int, default=defaults.cls_heads)
    parser.add_argument("--decoder", choices=DECODERS, default=defaults.decoder)
    parser.add_argument("--token-dropout", type=float, default=defaults.token_dropout)
    parser.add_argument("--chunk-size", type=int, default=defaults.chunk_size)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="steps of linear lr warm-up")
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--eval-chunks", type=int, default=defaults.eval_chunks, help="chunks per accuracy measure")
    parser.add_argument("--max-chunks", type=int, default=None, help="the first N chunks of the corpus only")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no-resume", action="store_true", help="start afresh even if OUT holds a checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> None:
    config = AutoencoderConfig(
        d_model=args.d_model,
        encoder_layers=args.encoder_layers,
        decoder_layers=args.decoder_layers,
        heads=args.heads,
        cls_heads=args.cls_heads,
        chunk_size=args.chunk_size,
        decoder=args.decoder,
        token_dropout=args.token_dropout,
        batch_size=args.batch_size,
        steps=args.steps,
        lr=args.lr,
        warmup=args.warmup,
        eval_every=args.eval_every,
        eval_chunks=args.eval_chunks,
        max_chunks=args.max_chunks,
        seed=args.seed,
        tokenizer=args.tokenizer,
    )
    try:
        train_autoencoder(config, out_dir=args.out, resume=not args.no_resume, progress=not args.no_progress)
    except ValueError as error:
        raise SystemExit(f"mllm train autoencoder: {error}") from None
    print((Path(args.out) / "convergence.md").read_text(encoding="utf-8"))
    print(f"wrote {args.out}/convergence.md, convergence.json, convergence.png and checkpoint.pt")
