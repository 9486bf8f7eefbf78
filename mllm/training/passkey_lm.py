"""A small LM that answers passkey questions from memory: trained with the memory and without.

Every example is its own haystack memory (``passkey_task``: filler text with "The pass key is
NN." at a random depth), encoded with MiniLM (or any ``ChunkEncoder``). The question is the same
for all ("What is the pass key?"), so the answer can only come from the memory.

Two LMs of the same shape (a GPT-2 from scratch over bytes: small enough to train on a CPU in
minutes) are trained side by side on the same examples and batches:

- **with memory**: a ``MemoryAugmentedLM``: the memory is searched with the question, the nodes
  selected at every level are projected by the ``MemoryProjector`` and put before the prompt; the
  LM and the projector train together;
- **without memory**: the bare LM on the prompt alone: it can only learn the answers' prior.

Retrieval does not change while the ranker is fixed, so each example's gathered nodes are computed
once (``MemoryAugmentedLM.gather``) and reused every epoch. Held-out haystacks (other filler,
other keys) measure exact-match accuracy of the greedy answer. Checkpoints (``passkey_lm.pt``)
let a stopped run resume. As a command: ``mllm train lm``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
from pathlib import Path

import torch

from ..config import MemoryConfig
from ..lm import IGNORE_INDEX, MemoryAugmentedLM
from ..memory import HierarchicalMemory
from ..tasks import filler_sentences, needle_hits, passkey_task
from ..tokenizers import ByteTokenizer
from .checkpoint import load_checkpoint, save_checkpoint

PROMPT = "pass key: "


@dataclasses.dataclass
class PasskeyLMConfig:
    """Sizes of the passkey LM experiment (defaults: about fifteen minutes on 2 CPU cores).

    Chunks of 32 tokens: the needle is then half of its chunk, and the two digits of the key are
    legible in the chunk's MiniLM embedding (an MLP probe of the gathered nodes reads about half
    of the keys); in 64-token chunks the LM did not pick them up within 1500 steps.

    Attributes:
        memory_tokens: tokens of filler per haystack (each example's memory).
        train_examples, test_examples: haystacks; each filler seed serves ``per_filler`` of them
            (different keys and depths on the same filler, so a chunk cache encodes it once).
        chunk_size, fanout, t: of the memories and their retrieval (beam ``t`` at every level,
            ``t`` leaves).
        layers, width, heads: of the GPT-2.
        steps, batch_size, lr: AdamW training of each LM.
        eval_every: held-out accuracy every this many steps.
    """

    memory_tokens: int = 2000
    page_tokens: int = 32
    train_examples: int = 2000
    test_examples: int = 200
    per_filler: int = 250
    chunk_size: int = 32
    fanout: int = 16
    t: int = 4
    layers: int = 2
    width: int = 128
    heads: int = 4
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    eval_every: int = 300
    seed: int = 0


def tiny_gpt2(config: PasskeyLMConfig, vocab_size: int, positions: int):
    """A GPT-2 from scratch (``transformers``), without dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(config.seed)
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab_size,
            n_positions=positions,
            n_embd=config.width,
            n_layer=config.layers,
            n_head=config.heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=vocab_size - 1,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        )
    )


def make_examples(encoder, config: PasskeyLMConfig, count: int, first_seed: int, reader: MemoryAugmentedLM, progress):
    """``count`` haystack memories; returns ``(gathered, answers, hits)``: each memory's gathered
    nodes for the question, the keys, and whether retrieval found the needle chunk."""
    from tqdm.auto import tqdm

    threads = torch.get_num_threads()
    # Thousands of tiny builds: one thread each is much faster than a thread team, which waits at
    # every op's barrier (twenty times slower on a loaded 2-core machine).
    torch.set_num_threads(1)
    try:
        return _make_examples(encoder, config, count, first_seed, reader, progress, tqdm)
    finally:
        torch.set_num_threads(threads)


def _make_examples(encoder, config, count, first_seed, reader, progress, tqdm):
    sentences = filler_sentences()
    rng = random.Random(first_seed)
    # No more levels than the haystacks need: every memory builds an encoder and ranker per level.
    leaves = 2 * config.memory_tokens / config.chunk_size
    levels = 2 + math.ceil(math.log(max(leaves, 2)) / math.log(config.fanout))
    memory_config = MemoryConfig(
        d_model=encoder.d_model, chunk_size=config.chunk_size, fanout=config.fanout, max_levels=min(8, levels)
    )
    embeddings, heights, valid, answers, hits = [], None, [], [], []
    with tqdm(total=count, desc="passkey memories", disable=not progress) as bar:
        for seed in range(first_seed, first_seed + -(-count // config.per_filler)):
            depths = [rng.random() for _ in range(min(config.per_filler, count - len(answers)))]
            cache: dict = {}
            for haystack in passkey_task(
                encoder.tokenizer,
                config.memory_tokens,
                depths,
                seed=seed,
                page_tokens=config.page_tokens,
                sentences=sentences,
            ):
                memory = HierarchicalMemory.build(
                    haystack.documents, encoder, memory_config, progress=False, chunk_cache=cache
                )
                query = memory.encode_queries(haystack.queries)
                emb, h, ok = reader.gather(query, memory)
                if heights is not None and not torch.equal(h, heights):
                    raise ValueError("passkey memories of one size must have the same levels; vary memory_tokens less")
                heights = h
                embeddings.append(emb[0])
                valid.append(ok[0])
                answers.append(haystack.answers[0])
                result = memory.retrieve(query, t=config.t, k=config.t)
                hits.append(bool(needle_hits(result, haystack.needles, list(range(len(haystack.documents))))[0]))
                bar.update(1)
    return (torch.stack(embeddings), heights, torch.stack(valid)), answers, torch.tensor(hits)


def _batch(tokenizer, answers: list[str], with_answer: bool = True):
    """Prompt (+ answer) token ids ``[B, T]`` (same length for all: the keys have two digits) and labels."""
    texts = [PROMPT + (answer if with_answer else "") for answer in answers]
    ids = torch.tensor(tokenizer.encode(texts), dtype=torch.int64)
    labels = torch.full_like(ids, IGNORE_INDEX)
    if with_answer:
        labels[:, -2:] = ids[:, -2:]
    return ids, labels


@torch.no_grad()
def accuracy(model, tokenizer, gathered, answers: list[str], batch_size: int = 100) -> float:
    """Exact-match accuracy of the greedy two-character answer; ``gathered=None``: the bare LM."""
    correct = 0
    for start in range(0, len(answers), batch_size):
        part = answers[start : start + batch_size]
        ids, _ = _batch(tokenizer, part, with_answer=False)
        kwargs = {"max_new_tokens": 2, "do_sample": False, "pad_token_id": tokenizer.pad_id}
        if gathered is None:
            new = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)[:, ids.shape[1] :]
        else:
            rows = slice(start, start + len(part))
            new = model.generate(ids, gathered=_select(gathered, rows), **kwargs)
        correct += sum(tokenizer.decode(row.tolist()) == answer for row, answer in zip(new, part))
    return correct / max(len(answers), 1)


def _examples_key(config: PasskeyLMConfig, encoder) -> dict:
    """What the saved examples depend on: the data settings and the encoder's weights."""
    fields = (
        "memory_tokens",
        "page_tokens",
        "train_examples",
        "test_examples",
        "per_filler",
        "chunk_size",
        "fanout",
        "t",
        "seed",
    )
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return {**{name: getattr(config, name) for name in fields}, "encoder": digest.hexdigest()}


def _resumable(config: dict) -> dict:
    """What a checkpoint must agree on to be resumed: everything but the number of steps."""
    return {key: value for key, value in config.items() if key != "steps"}


def _batch_rows(config: PasskeyLMConfig, count: int, step: int) -> torch.Tensor:
    """The training rows of ``step``: epochs of reshuffled examples, a function of the step alone
    (so a resumed run draws the batches the uninterrupted one would have)."""
    per_epoch = max(1, count // config.batch_size)
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(config.seed * 1_000_003 + epoch))
    return order[index * config.batch_size : (index + 1) * config.batch_size]


def _select(gathered, rows):
    embeddings, heights, valid = gathered
    return embeddings[rows], heights, valid[rows]


def train_passkey_lm(encoder, config: PasskeyLMConfig, *, out_dir, resume: bool = True, progress: bool = True) -> dict:
    """Train both LMs and measure them; writes ``passkey_lm.md`` / ``.json`` / ``.png`` into ``out_dir``.

    Returns ``{"rows": [{step, loss_memory, loss_bare, acc_memory, acc_bare}], "retrieval_hit": ...}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / "passkey_lm.pt"
    tokenizer = ByteTokenizer()
    positions = 64 + 3 * config.t + len(PROMPT) + 2
    lm_memory = tiny_gpt2(config, tokenizer.vocab_size, positions)
    lm_bare = tiny_gpt2(config, tokenizer.vocab_size, positions)
    lm_bare.load_state_dict(lm_memory.state_dict())  # same start
    reader_memory = HierarchicalMemory(encoder, MemoryConfig(d_model=encoder.d_model, chunk_size=config.chunk_size))
    model = MemoryAugmentedLM(lm_memory, reader_memory, t=config.t, k=config.t, freeze_lm=False)

    start = time.perf_counter()
    examples_path = out_dir / "passkey_examples.pt"  # building thousands of memories is the slow part
    examples = load_checkpoint(examples_path) if resume else None
    if examples is None or examples["key"] != _examples_key(config, encoder):
        examples = {
            "key": _examples_key(config, encoder),
            "train": make_examples(encoder, config, config.train_examples, config.seed + 2000, model, progress),
            "test": make_examples(encoder, config, config.test_examples, config.seed + 3000, model, progress),
        }
        save_checkpoint(examples_path, examples)
    (train, train_answers, train_hits), (test, test_answers, test_hits) = examples["train"], examples["test"]
    build_seconds = time.perf_counter() - start

    optimizers = {
        "memory": torch.optim.AdamW(model.parameters(), lr=config.lr),
        "bare": torch.optim.AdamW(lm_bare.parameters(), lr=config.lr),
    }
    state = {"step": 0, "rows": []}
    saved = load_checkpoint(checkpoint) if resume else None
    if saved is not None:
        if _resumable(saved["config"]) != _resumable(dataclasses.asdict(config)):
            raise ValueError(f"train_passkey_lm: {checkpoint} was written with another config; use --no-resume")
        model.load_state_dict(saved["model"])
        lm_bare.load_state_dict(saved["bare"])
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(saved["optimizers"][name])
        state = saved["state"]

    from tqdm.auto import tqdm

    model.train()
    lm_bare.train()
    losses = {"memory": [], "bare": []}
    with tqdm(total=config.steps, initial=state["step"], desc="training passkey LMs", disable=not progress) as bar:
        while state["step"] < config.steps:
            rows = _batch_rows(config, len(train_answers), state["step"])
            ids, labels = _batch(tokenizer, [train_answers[i] for i in rows.tolist()])
            loss_memory = model(ids, labels=labels, gathered=_select(train, rows)).loss
            loss_bare = lm_bare(ids, labels=labels).loss
            for name, loss in (("memory", loss_memory), ("bare", loss_bare)):
                optimizers[name].zero_grad(set_to_none=True)
                loss.backward()
                optimizers[name].step()
                losses[name].append(loss.item())
            state["step"] += 1
            bar.update(1)
            bar.set_postfix(memory=f"{losses['memory'][-1]:.3f}", bare=f"{losses['bare'][-1]:.3f}")
            if state["step"] % config.eval_every == 0 or state["step"] == config.steps:
                model.eval()
                lm_bare.eval()
                state["rows"].append(
                    {
                        "step": state["step"],
                        "loss_memory": sum(losses["memory"]) / max(len(losses["memory"]), 1),
                        "loss_bare": sum(losses["bare"]) / max(len(losses["bare"]), 1),
                        "acc_memory": accuracy(model, tokenizer, test, test_answers),
                        "acc_bare": accuracy(lm_bare, tokenizer, None, test_answers),
                        "acc_memory_train": accuracy(
                            model,
                            tokenizer,
                            _select(train, slice(0, config.test_examples)),
                            train_answers[: config.test_examples],
                        ),
                    }
                )
                losses = {"memory": [], "bare": []}
                model.train()
                lm_bare.train()
                save_checkpoint(
                    checkpoint,
                    {
                        "config": dataclasses.asdict(config),
                        "model": model.state_dict(),
                        "bare": lm_bare.state_dict(),
                        "optimizers": {name: o.state_dict() for name, o in optimizers.items()},
                        "state": state,
                    },
                )
    report = {
        "rows": state["rows"],
        "retrieval_hit_train": float(train_hits.float().mean()),
        "retrieval_hit_test": float(test_hits.float().mean()),
        "memory_slots": int(train[0].shape[1]),
        "build_seconds": build_seconds,
        "config": dataclasses.asdict(config),
    }
    write_reports(report, out_dir)
    return report


def markdown(report: dict) -> str:
    config = report["config"]
    lines = [
        (
            f"Passkey LM (GPT-2 {config['layers']}x{config['width']} from scratch, bytes): exact-match accuracy of "
            f"the two-digit key on {config['test_examples']} held-out haystacks of {config['memory_tokens']} tokens; "
            f"chance 1/90. Memory prefix: {report['memory_slots']} nodes; the needle chunk was among the "
            f"{config['t']} leaves retrieved for {report['retrieval_hit_test']:.0%} of the held-out haystacks "
            f"({report['retrieval_hit_train']:.0%} of the training ones)."
        ),
        "",
        "| step | loss, with memory | loss, without | accuracy, with memory | accuracy, without | with memory, on training haystacks |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['step']} | {row['loss_memory']:.3f} | {row['loss_bare']:.3f} | {row['acc_memory']:.1%} | "
            f"{row['acc_bare']:.1%} | {row['acc_memory_train']:.1%} |"
        )
    return "\n".join(lines)


def write_reports(report: dict, out_dir) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    (out_dir / "passkey_lm.md").write_text(markdown(report) + "\n")
    (out_dir / "passkey_lm.json").write_text(json.dumps(report, indent=1) + "\n")
    rows = report["rows"]
    steps = [r["step"] for r in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(steps, [r["loss_memory"] for r in rows], "o-", label="with memory")
    left.plot(steps, [r["loss_bare"] for r in rows], "o--", label="without memory")
    left.set_xlabel("step")
    left.set_ylabel("training loss (answer tokens)")
    left.legend()
    right.plot(steps, [r["acc_memory"] for r in rows], "o-", label="with memory")
    right.plot(steps, [r["acc_bare"] for r in rows], "o--", label="without memory")
    right.axhline(1 / 90, color="grey", lw=0.8, label="chance")
    right.set_xlabel("step")
    right.set_ylabel("held-out exact match")
    right.set_ylim(0, 1)
    right.legend()
    figure.tight_layout()
    figure.savefig(out_dir / "passkey_lm.png", dpi=120)
    plt.close(figure)


def add_arguments(parser) -> None:
    defaults = PasskeyLMConfig()
    parser.add_argument("--out", default="bench_results/passkey_lm", help="checkpoint and report directory")
    parser.add_argument("--memory-tokens", type=int, default=defaults.memory_tokens)
    parser.add_argument("--train-examples", type=int, default=defaults.train_examples)
    parser.add_argument("--test-examples", type=int, default=defaults.test_examples)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--t", type=int, default=defaults.t, help="beam per level and leaves read")
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no-resume", action="store_true", help="start afresh even if OUT holds a checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> None:
    """``mllm train lm``: the passkey LM with memory against without."""
    from ..encoders import cpu_has_native_bf16
    from ..pretrained import minilm_encoder

    config = PasskeyLMConfig(
        memory_tokens=args.memory_tokens,
        train_examples=args.train_examples,
        test_examples=args.test_examples,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        t=args.t,
        eval_every=args.eval_every,
        seed=args.seed,
    )
    encoder = minilm_encoder(autocast_dtype=torch.bfloat16 if cpu_has_native_bf16() else None)
    try:
        report = train_passkey_lm(
            encoder, config, out_dir=args.out, resume=not args.no_resume, progress=not args.no_progress
        )
    except ValueError as error:
        raise SystemExit(f"mllm train lm: {error}") from None
    print(markdown(report))
    print(f"wrote {args.out}/passkey_lm.md, passkey_lm.json, passkey_lm.png and passkey_lm.pt")
