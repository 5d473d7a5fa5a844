"""Typed configuration for every stage, registered in Hydra's ConfigStore.

Hydra composes `configs/*.yaml` on top of these dataclasses, so a misspelt key or a
value of the wrong type fails at start-up with a one-line message instead of deep
inside a training loop; `check` does the same for values out of their range (a negative
temperature, a share above 1). Defaults here are the `tiny` laptop pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore


ATTENTION = ("manual", "xla", "cudnn")  # model.attention: written out | library kernels
DTYPES = ("float32", "bfloat16", "float16")  # model.dtype, the compute dtype
ADVANTAGES = ("gae", "rloo")  # ppo.advantage: GAE with a value model | leave-one-out
VALUE_MODELS = ("separate", "shared")  # ppo.value_model: own trunk (from the RM) | policy's trunk
REWARD_SOURCES = ("model", "gold")  # ppo.reward_source: the reward model | the gold judge
K_RANGE = (2, 9)  # reward.k: completions ranked per prompt (InstructGPT ranks 4 to 9)


@dataclass
class ModelConfig:
    """GPT-2 decoder shape. Presets live in configs/model/{tiny,small,gpt2}.yaml."""

    vocab_size: int = 2048
    block_size: int = 256  # maximum context length (learned positions)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    # GPT-2 trained with 0.1; 0 here, as nanoGPT: the tiny models underfit ChatWorld's corpus.
    # Applied in pretraining, SFT and reward-model training, never in PPO (N-details #5).
    dropout: float = 0.0
    attention: str = "manual"  # manual (written out, readable) | xla | cudnn
    dtype: str = "float32"  # compute dtype; parameters are always float32
    remat: bool = False  # rematerialise each block in the backward pass


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay to `min_lr_ratio * lr`."""

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping; 0 = off


@dataclass
class WorldConfig:
    """ChatWorld: the synthetic world every built-in dataset is generated from."""

    seed: int = 0
    # A small world: a ~1M-parameter model memorises it in a few CPU minutes (measured:
    # ~83% of facts recalled after the default pretraining, vs ~30% for a 2x larger world).
    n_countries: int = 16
    n_animals: int = 12
    n_people: int = 10
    arith_max: int = 10  # largest operand of + and - (x goes to half of it)
    n_docs: int = 20000  # pretraining corpus documents
    n_dialogues: int = 6000  # SFT demonstrations (train split)
    n_heldout: int = 80  # held-out prompts per family for evaluation (SE of a share ~0.05)


@dataclass
class TokenizerConfig:
    vocab_size: int = 2048
    path: str = ""  # an existing tokenizer.json; empty = train one on the corpus


@dataclass
class CopyConfig:
    """Optional in-context copying task that gives the tiny model induction heads (Olsson et
    al. 2022), which ChatWorld's corpus alone does not (docs 01, section 8): rows of random
    tokens in which a span recurs after a gap, the loss on the recurrence only. `steps` of it
    alone before pretraining (its own optimizer: at pretraining's lr 3e-3 the loss never
    leaves its plateau), then `rows` of every pretraining batch keep to it, or pretraining
    erases the heads. Off by default. The preset `+experiment=induction` (2,000 steps, as the
    phase change came at 1,100-1,400, + 2 rows) measured: copy test 0.00 -> 0.86, SFT
    summaries 0.10 -> 0.68 but overall 0.60 -> 0.51, about 380 s more (docs 02, section 8)."""

    steps: int = 0  # warm-up steps on the task alone; 0 = no warm-up
    rows: int = 0  # rows of each pretraining batch given to the task; 0 = none
    batch_size: int = 16  # rows are pretraining's (pretrain.seq_len + 1 tokens)
    span_min: int = 8  # the recurring span's length is drawn from [span_min, span_max];
    span_max: int = 48  # the gap before the recurrence from [0, seq_len + 1 - 2 * span]
    eval_every: int = 250
    eval_batches: int = 4
    checkpoint_every: int = 250
    keep: int = 2
    # Constant after the warmup (min_lr_ratio 1), Adam's default b2: the loss leaves its
    # plateau after 1,100-1,400 steps at 1e-3. At 3e-3 decaying, it never did in 1,500.
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, min_lr_ratio=1.0, b2=0.999))


@dataclass
class PretrainConfig:
    # Many small steps memorise the world's facts faster than few large ones at the same
    # token budget (measured: 1200 x 16 x 128 tokens beat 300 x 32 x 256 on held-out loss
    # 0.48 vs 0.76 and fact recall 83% vs 31%), but not without end: 2400 x 8 x 128 gave
    # the loss of 1200 x 16 x 128 (0.541 vs 0.539). The tiny model is short of tokens:
    # SFT held-out correct 0.50 after 1200 steps, 0.55 after 1800, 0.56 after 2400 (one run
    # each). 1600 is what fits the 15-minute pipeline since the reward model shares prompts.
    steps: int = 1600
    batch_size: int = 16
    seq_len: int = 128  # training window; 0 = the model's block_size (documents are short)
    eval_every: int = 200
    eval_batches: int = 8
    checkpoint_every: int = 200
    keep: int = 2  # checkpoints kept
    files: list[str] = field(default_factory=list)  # user's .txt / .jsonl ({"text"}) files
    samples: int = 3  # samples printed at the end
    # Peak lr, measured on the default pipeline (1600 steps; held-out loss / SFT held-out
    # correct, greedy, same seed): 3e-3 0.564 / 0.54, 5e-3 0.545 / 0.57, 7e-3 0.556 / 0.52.
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-3))
    copy: CopyConfig = field(default_factory=CopyConfig)


@dataclass
class SFTConfig:
    # Measured on the same pretrained model: 400 steps 0.53 / 0.47 held-out correct (greedy /
    # sampled), 800 steps 0.58 / 0.51, ~90 s more: paid for by the reward model's one epoch.
    # 720 since session 17: the corpus-only tokenizer widened the packed rows from 144 to 160
    # tokens, and 720 x 160 is the token budget of 800 x 144 (on session 17's pretrained
    # model, 720 steps 0.48 / 0.45 against 800 steps' 0.48 / 0.45, 20 s less)
    steps: int = 720
    batch_size: int = 16
    eval_every: int = 50
    checkpoint_every: int = 50
    keep: int = 2
    files: list[str] = field(default_factory=list)  # user's {"messages": [...]} JSONL
    # Share of each batch's rows that are pretraining text (plain LM loss), so that SFT
    # keeps what pretraining learned (cf. InstructGPT's PPO-ptx); 0 = pure SFT.
    # Measured on the default run: held-out correct 0.23 -> 0.35 (greedy) with 0.5 and 400 steps.
    lm_mix: float = 0.5
    # Pack several demonstrations per row (segment ids keep them apart): same loss per
    # conversation, ~3x the demonstrations per step on ChatWorld's short dialogues.
    pack: bool = True
    # Share of the demonstrations' user turns wrapped in a greeting or a thanks (ChatWorld
    # only; held-out prompts are never wrapped), for robustness to unseen phrasings.
    # Measured: held-out correct 0.39 -> 0.45 (greedy) with 0.3.
    augment: float = 0.3
    eval_temperature: float = 0.7
    max_new_tokens: int = 64
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=30))


@dataclass
class LabelerConfig:
    """Simulated labelers: gold score + Gumbel noise (Bradley-Terry) + optional length bias."""

    noise: float = 0.1  # temperature of the Gumbel noise; 0 = a perfect labeler
    # utility bonus length_bias * log(1 + words): the seeds' trainers' taste for longer replies
    length_bias: float = 0.0


@dataclass
class RewardConfig:
    k: int = 4  # completions sampled from the policy per prompt (InstructGPT ranks 4..9)
    # ChatWorld only: rank the demonstration and `n_flawed` of the world's flawed replies
    # beside the samples, as InstructGPT compared outputs of several sources. A small policy
    # often samples K identical replies; these extra completions give every ranking signal.
    with_ideal: bool = True
    n_flawed: int = 2
    # Prompts sampled for comparisons, per round: the reward model's one lever that works
    # (docs 03, section 7). Session 22's default run, same SFT model: 6144 prompts 25% of the
    # way to the labelers' ceiling, Spearman with gold 0.505; 12288 40%, 0.639, for ~90 s more.
    n_prompts: int = 12288
    n_heldout: int = 256  # held-out prompts for RM evaluation
    # User phrasings of the comparison prompts: "rl", the wordings that only the RL stages'
    # prompts use (InstructGPT's reward-model and PPO prompts are not SFT's; docs 03), or
    # "train", those of the SFT demonstrations, where the policy's samples mostly tie in gold.
    phrasings: str = "rl"
    # Held-out comparisons: fresh prompts and samples about the SFT entities in `phrasings`
    # ("train"), or about held-out entities in held-out phrasings ("heldout"), the prompts
    # of the final evaluation.
    heldout_split: str = "train"
    sample_temperature: float = 1.0
    max_new_tokens: int = 48
    files: list[str] = field(default_factory=list)  # user's K-way / pairwise JSONL
    # One epoch, as InstructGPT (more overfits). This reward model is small and its labels are
    # noisy, and a second epoch helped it a little (same SFT model and comparisons: expected
    # held-out accuracy 0.533 -> 0.542, Spearman with gold 0.644 -> 0.662, 0.629 -> 0.675 where
    # gold differs) for ~85 s, which 400 more SFT steps put to better use (SFTConfig.steps).
    epochs: int = 1
    batch_size: int = 16  # prompts per batch; each carries all C(K,2) pairs
    # 768 steps by default (one epoch): 3 held-out evaluations (~1.2 s each) and checkpoints
    eval_every: int = 200
    checkpoint_every: int = 200
    keep: int = 2
    labeler: LabelerConfig = field(default_factory=LabelerConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, warmup_steps=10, min_lr_ratio=0.0))
    heldout_files: list[str] = field(default_factory=list)  # user's held-out comparisons
    heldout_frac: float = 0.1  # share of `files` held out when `heldout_files` is empty
    n_norm: int = 256  # SFT demonstrations scored to set the normalisation bias
    sample_batch_size: int = 128  # rows per sampling call (fixed shape: one compile)
    # Round r > 1 (`rounds`): go on training the previous round's reward model on the new
    # comparisons (True), or train a fresh one from SFT on them alone (False).
    continue_rounds: bool = True


@dataclass
class PPOConfig:
    # rollout + update cycles: 28 since session 17, when 40 took the default pipeline past 15
    # minutes (913 s; 888 s with 32). At 28, 32 and 40 iterations PPO was no better than SFT
    # on held-out prompts in session 17's runs (docs 04, section 10)
    iterations: int = 28
    batch_size: int = 64  # prompts per rollout
    minibatch_size: int = 16  # rollouts per optimizer step
    micro_batch_size: int = 16  # rollouts per forward/backward (gradient accumulation)
    epochs: int = 4  # PPO epochs over each rollout batch
    samples_per_prompt: int = 1  # replies sampled per prompt (batch_size / this distinct prompts)
    advantage: str = "gae"  # gae (value model, Schulman et al. 2016) | rloo (leave-one-out)
    # shared: a zero-initialised head on the policy's own trunk, trained by one loss
    # pg_loss + vf_coef * vf_loss (the PPO paper's eq. 9 for networks that share parameters):
    # one trunk pass instead of two. separate: a trunk of its own, initialised from the
    # reward model (InstructGPT; N-details #15). Measured over five PPO seeds on one SFT and
    # reward model, held-out gold PPO - SFT, greedy / sampled: shared +0.041 / +0.025 (every
    # seed above zero), separate +0.013 / +0.002 and 1.5x slower per iteration (docs 04,
    # sections 10 and 11)
    value_model: str = "shared"
    temperature: float = 0.7
    max_new_tokens: int = 48
    # beta, the KL penalty (initial value if adaptive). Measured on default runs (docs 04,
    # section 9): 0.05 over-optimised a weak reward model (held-out gold -0.18 vs SFT, KL 4
    # nats); 0.2 stayed within noise of SFT on most reward models but let a more exploitable
    # one run to KL 3.7 nats (-0.145); 0.5 held that one near KL 1 (sampled +0.055 and +0.038
    # over two seeds, greedy +0.008 / -0.017); 1.0 held it at KL 0.2 and gained nothing.
    kl_coef: float = 0.5
    adaptive_kl: bool = False  # Ziegler et al. 2019 controller
    kl_target: float = 6.0
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    clip_ratio: float = 0.2
    clip_value: float = 0.2
    # The separate value model has its own trunk and its own AdamW, which is blind to a
    # gradient's scale: vf_coef only moves the value gradient's clipping threshold (to
    # 1 / vf_coef); set its pace with ppo.optim. With value_model=shared, vf_coef weighs the
    # value loss's gradient in the shared trunk against the policy loss's (PPO's c1).
    vf_coef: float = 0.1
    # value_model=shared: the learning rate of the new head's own AdamW (the trunk keeps
    # ppo.optim's); a head that starts at zero needs more than the policy's 1e-5 to fit returns
    value_head_lr: float = 1e-3
    whiten_rewards: bool = False
    # model: the reward model of `reward` (the recipe); gold: ChatWorld's judge itself, a
    # diagnostic that takes the reward model out of the question (docs 04, section 9)
    reward_source: str = "model"
    no_end_penalty: float = -1.0  # score of a reply that never emits <|end|> (or its own, if lower)
    ptx_coef: float = 0.0  # InstructGPT's PPO-ptx gamma (pretraining loss mix-in)
    files: list[str] = field(default_factory=list)  # user's prompt JSONL
    checkpoint_every: int = 10
    keep: int = 2
    best_of_n: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    best_of_n_prompts: int = 64  # prompts sampled max(best_of_n) times for the baseline
    n_prompts: int = 4096  # ChatWorld train-split prompts in the rollout pool
    # their user phrasings: "rl" (never in a demonstration, as InstructGPT's PPO prompts were
    # not its SFT prompts; docs 04, section 9) or "train" (the demonstrations' own)
    phrasings: str = "rl"
    # left-padded prompt width; 0 = the smallest multiple of 16 that holds 95% of the prompts
    # (longer ones are left out of the pool, not truncated)
    prompt_width: int = 0
    ptx_batch_size: int = 8  # pretraining sequences per micro-batch when ptx_coef > 0
    ptx_seq_len: int = 64
    evaluate: bool = True  # held-out gold evaluation of SFT vs PPO at the end (ChatWorld)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, warmup_steps=0, min_lr_ratio=1.0,
                                                                 weight_decay=0.0))


@dataclass
class ParallelConfig:
    """Device mesh: `data` x `fsdp` devices (-1 = all remaining devices)."""

    data: int = -1
    fsdp: int = 1
    # multi-host: left empty, jax.distributed.initialize() auto-detects (TPU pods, SLURM)
    distributed: bool = False
    coordinator_address: str = ""
    num_processes: int = 1
    process_id: int = 0
    # per-device peak FLOP/s for the logged MFU; 0 = the table of GPUs/TPUs in
    # minichat/parallel.py (dense bf16), or an fp32 matmul measured once on CPU
    peak_flops: float = 0.0
    # on CPU, pretraining and SFT compute each step's gradient, and PPO each micro-batch's,
    # as this many independent sub-batches, which XLA runs on its threads at once: 12.7k ->
    # 14.1k tokens/s for the tiny preset on 2 cores with 2, a PPO iteration 1.28 -> 1.21 s
    # (the same mean loss; 1 = one chain, as on accelerators)
    cpu_splits: int = 2


@dataclass
class Config:
    run_name: str = "tiny"
    run_dir: str = ""  # default: runs/<run_name>
    stage: str = "all"  # all | tokenizer | pretrain | sft | comparisons | reward | ppo | report
    seed: int = 0
    resume: bool = True  # continue from the newest checkpoint of the stage, if any
    progress: bool = True  # progress bars
    compilation_cache: str = "~/.cache/minichat/jax"  # empty disables the persistent cache
    model: ModelConfig = field(default_factory=ModelConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    rounds: int = 1  # RLHF rounds: comparisons -> reward -> PPO, each from the current policy
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


# Value ranges that types cannot express, checked before any stage runs (`check`), so that
# `ppo.temperature=-1` is one line at start-up rather than a run of garbage rollouts.
_positive = (lambda v: v > 0, "must be > 0")
_non_negative = (lambda v: v >= 0, "must be >= 0")
_share = (lambda v: 0 <= v <= 1, "must be in [0, 1]")
_below_one = (lambda v: 0 <= v < 1, "must be in [0, 1)")
# Orbax reads 0 as "keep none": the stage would end with no checkpoint for the next to load
_keep = (lambda v: v >= 1, "must be >= 1 (the newest checkpoint is what the next stage loads)")
_RULES = {
    "model.vocab_size": _positive, "model.block_size": _positive, "model.n_layer": _positive,
    "model.n_head": _positive, "model.n_embd": _positive,
    "model.dropout": _below_one,
    "model.attention": (lambda v: v in ATTENTION, f"must be one of {', '.join(ATTENTION)}"),
    "model.dtype": (lambda v: v in DTYPES, f"must be one of {', '.join(DTYPES)}"),
    "pretrain.steps": _positive, "pretrain.batch_size": _positive, "pretrain.seq_len": _non_negative,
    "pretrain.copy.steps": _non_negative, "pretrain.copy.rows": _non_negative,
    "pretrain.copy.batch_size": _positive,
    "pretrain.copy.span_min": (lambda v: v >= 2, "must be >= 2 (a span's first token cannot be copied)"),
    "sft.steps": _positive, "sft.batch_size": _positive, "sft.lm_mix": _below_one,
    "sft.augment": _share, "sft.eval_temperature": _non_negative,
    "reward.n_flawed": _non_negative,
    "reward.k": (lambda v: K_RANGE[0] <= v <= K_RANGE[1],
                 f"must be in {K_RANGE[0]}..{K_RANGE[1]} (InstructGPT ranks 4 to 9 replies)"),
    "reward.n_prompts": _positive, "reward.n_heldout": _positive, "reward.epochs": _positive,
    "reward.batch_size": _positive, "reward.sample_temperature": _non_negative,
    "reward.heldout_split": (lambda v: v in ("train", "heldout"), "must be train or heldout"),
    **{f"{stage}.phrasings": (lambda v: v in ("rl", "train"), "must be rl or train") for stage in ("reward", "ppo")},
    "reward.labeler.noise": _non_negative,
    "ppo.iterations": _positive, "ppo.epochs": _positive, "ppo.batch_size": _positive,
    "ppo.minibatch_size": _positive, "ppo.micro_batch_size": _positive,
    "ppo.temperature": (lambda v: v > 0, "must be > 0 (PPO needs sampled rollouts and their logprobs)"),
    "ppo.max_new_tokens": _positive, "ppo.kl_coef": _non_negative, "ppo.kl_target": _positive,
    "ppo.kl_horizon": _positive, "ppo.gamma": _share, "ppo.lam": _share,
    "ppo.clip_ratio": _positive, "ppo.clip_value": _positive, "ppo.vf_coef": _non_negative,
    "ppo.ptx_coef": _non_negative, "ppo.samples_per_prompt": _positive,
    "ppo.advantage": (lambda v: v in ADVANTAGES, f"must be one of {', '.join(ADVANTAGES)}"),
    "ppo.value_model": (lambda v: v in VALUE_MODELS, f"must be one of {', '.join(VALUE_MODELS)}"),
    "ppo.value_head_lr": _positive,
    "ppo.reward_source": (lambda v: v in REWARD_SOURCES, f"must be one of {', '.join(REWARD_SOURCES)}"),
    "rounds": _non_negative, "parallel.cpu_splits": _positive,
    **{f"{stage}.keep": _keep for stage in ("pretrain", "pretrain.copy", "sft", "reward", "ppo")},
    **{f"{stage}.checkpoint_every": _positive for stage in ("pretrain", "pretrain.copy", "sft", "reward", "ppo")},
    **{f"{stage}.eval_every": _positive for stage in ("pretrain", "pretrain.copy", "sft", "reward")},
    # the stage's summary is its held-out loss: at least one batch of it
    "pretrain.eval_batches": _positive, "pretrain.copy.eval_batches": _positive,
    "sft.max_new_tokens": _positive, "reward.max_new_tokens": _positive,
    "reward.heldout_frac": (lambda v: 0 < v < 1, "must be in (0, 1)"),
    "ppo.prompt_width": (lambda v: v >= 0, "must be >= 0 (0 = chosen from the prompts)"),
    "ppo.best_of_n": (lambda v: not isinstance(v, (int, float, str)) and len(v) > 0
                      and all(n >= 1 for n in v), "must be a non-empty list of n >= 1"),
    "ppo.best_of_n_prompts": _positive,
    # every dialogue family needs two of each kind of entity in each split
    "world.n_countries": (lambda v: v >= 3, "must be >= 3"), "world.n_animals": (lambda v: v >= 2, "must be >= 2"),
    "world.n_people": (lambda v: v >= 2, "must be >= 2"), "world.arith_max": (lambda v: v >= 2, "must be >= 2"),
    "world.n_docs": _positive, "world.n_dialogues": (lambda v: v >= 2, "must be >= 2"),
    "world.n_heldout": _positive,
    # byte-level BPE starts from the 256 bytes and the chat's special tokens
    "tokenizer.vocab_size": (lambda v: v > 256 + 6, "must be > 262 (256 bytes + 6 special tokens)"),
}


def check_batch_sizes(batch_size: int, minibatch_size: int, micro_batch_size: int,
                      samples_per_prompt: int = 1, advantage: str = "gae") -> None:
    """Batch (rollouts per iteration) / minibatch (rollouts per optimizer step) / micro-batch
    (rollouts per forward-backward) are three different things (N-details #14); the batch
    holds `samples_per_prompt` replies to each of its prompts."""
    if batch_size % minibatch_size or minibatch_size % micro_batch_size:
        raise ValueError(f"ppo.batch_size={batch_size} must be a multiple of ppo.minibatch_size="
                         f"{minibatch_size}, itself a multiple of ppo.micro_batch_size={micro_batch_size}")
    if advantage not in ADVANTAGES:
        raise ValueError(f"ppo.advantage={advantage!r}: expected {' or '.join(map(repr, ADVANTAGES))}")
    if samples_per_prompt < 1 or batch_size % samples_per_prompt:
        raise ValueError(f"ppo.batch_size={batch_size} must be a multiple of ppo.samples_per_prompt="
                         f"{samples_per_prompt}")
    if advantage == "rloo" and samples_per_prompt < 2:
        raise ValueError("ppo.advantage=rloo compares the replies to one prompt: it needs "
                         f"ppo.samples_per_prompt >= 2 (got {samples_per_prompt})")


def check(cfg) -> None:
    """Raise ValueError naming the first config value out of its range (`_RULES`)."""
    for key, (ok, reason) in _RULES.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if not ok(value):
            raise ValueError(f"{key}={value!r} {reason}")
    # rules between two settings, which would otherwise fail only when their stage starts
    if cfg.model.n_embd % cfg.model.n_head:
        raise ValueError(f"model.n_embd={cfg.model.n_embd} must be a multiple of model.n_head="
                         f"{cfg.model.n_head} (each head gets n_embd / n_head dimensions)")
    if cfg.pretrain.seq_len > cfg.model.block_size:
        raise ValueError(f"pretrain.seq_len={cfg.pretrain.seq_len} must be <= model.block_size="
                         f"{cfg.model.block_size} (the learned positions end there)")
    p = cfg.ppo
    check_batch_sizes(p.batch_size, p.minibatch_size, p.micro_batch_size, p.samples_per_prompt,
                      p.advantage)
    copy, width = cfg.pretrain.copy, (cfg.pretrain.seq_len or cfg.model.block_size) + 1
    if (copy.steps or copy.rows) and not copy.span_min <= copy.span_max <= width // 2:
        raise ValueError(f"pretrain.copy.span_max={copy.span_max} must be in [span_min={copy.span_min}, "
                         f"{width // 2}] (a span and its recurrence must fit a pretraining row)")
    if copy.rows >= cfg.pretrain.batch_size:
        raise ValueError(f"pretrain.copy.rows={copy.rows} must be < pretrain.batch_size="
                         f"{cfg.pretrain.batch_size} (the rest of each batch is the corpus)")
    r = cfg.reward
    if r.k + r.with_ideal + r.n_flawed > K_RANGE[1]:  # ChatWorld ranks the extra replies too
        raise ValueError(f"reward.k={r.k} + reward.with_ideal={int(r.with_ideal)} + reward.n_flawed="
                         f"{r.n_flawed} = {r.k + r.with_ideal + r.n_flawed} replies per prompt; at "
                         f"most {K_RANGE[1]} are ranked (lower reward.k or reward.n_flawed)")
    optims = {name: getattr(cfg, name).optim for name in ("pretrain", "sft", "reward", "ppo")}
    for name, optim in {**optims, "pretrain.copy": copy.optim}.items():
        for key, (ok, reason) in {"lr": _positive, "warmup_steps": _non_negative, "min_lr_ratio": _share,
                                  "weight_decay": _non_negative, "grad_clip": _non_negative,
                                  "b1": _below_one, "b2": _below_one,
                                  "eps": _positive}.items():
            if not ok(getattr(optim, key)):
                raise ValueError(f"{name}.optim.{key}={getattr(optim, key)!r} {reason}")


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="model", name="base_model", node=ModelConfig)


register_configs()
