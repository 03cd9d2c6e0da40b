"""Typed schemas for everything a training run reads: model, data, train, parallel,
checkpoint and logging sections.

Every section forbids unknown keys, so a typo is an error that names the key rather
than a silently ignored setting. Cross-field rules that only make sense for a whole
run (batch arithmetic, sequence vs position table, experts vs expert-parallel size)
live on `RunConfig`, and so does the layout for a number of processes (`for_world`).
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, model_validator

from trainer import masked_lm, span_corruption
from trainer.errors import TrainError
from trainer.special_tokens import BERT_VOCAB_SIZE, CLS, PAD, SPAN_CORRUPTION_VOCAB_SIZE

GPT2_VOCAB_SIZE = 50257  # GPT-2 BPE: 50,000 merges + 256 bytes + <|endoftext|>


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MoEConfig(Section):
    """Switch Transformer top-1 routing (Fedus et al. 2021) with ST-MoE's router z-loss."""

    num_experts: PositiveInt
    every: PositiveInt = Field(2, description="every k-th FFN is a MoE layer (Switch: 2; Switch-C: 1)")
    capacity_factor: PositiveFloat = Field(1.25, description="expert capacity factor in training")
    eval_capacity_factor: PositiveFloat = Field(2.0, description="expert capacity factor in eval mode")
    jitter: float = Field(0.0, ge=0.0, lt=1.0, description="multiplicative router input noise in training (Switch: 1e-2)")
    aux_loss_coef: float = Field(0.01, ge=0.0, description="alpha of the load-balancing loss")
    z_loss_coef: float = Field(1e-3, ge=0.0, description="router z-loss coefficient (ST-MoE)")
    expert_init_scale: PositiveFloat = Field(0.1, description="expert weight init std is scaled by this (Switch: 0.1)")
    expert_d_ff: Optional[PositiveInt] = Field(None, description="expert hidden width; default: model d_ff")
    routing_group: Union[Literal["batch", "sequence"], PositiveInt] = Field(
        "batch", description="tokens that share one expert capacity: 'batch' (all of a micro-batch), 'sequence' "
                             "(each sequence: Hugging Face SwitchTransformers), or N consecutive tokens (Mesh "
                             "TensorFlow's group_size; N must divide every micro-batch's token count)")
    expert_capacity: Optional[PositiveInt] = Field(
        None, description="fixed slots per expert and routing group, in training and eval alike (Hugging Face "
                          "SwitchTransformers' expert_capacity); default: "
                          "ceil(capacity_factor * group tokens / experts)")
    router_bias: bool = Field(False, description="a bias on the router's logits (SwitchTransformers' router_bias)")


class ModelConfig(Section):
    """A GPT decoder (`arch: decoder`), an encoder-decoder (`arch: encoder_decoder`: Vaswani et al. 2017,
    T5, Switch as published) or BERT (`arch: encoder`). For the encoder-decoder, n_layer counts decoder blocks."""

    name: str = "gpt"
    arch: Literal["decoder", "encoder_decoder", "encoder"] = "decoder"
    n_layer: PositiveInt
    n_encoder_layer: Optional[PositiveInt] = Field(None, description="encoder blocks (encoder_decoder); "
                                                                    "default: n_layer")
    n_head: PositiveInt
    d_model: PositiveInt
    d_kv: Optional[PositiveInt] = Field(None, description="width of one attention head; default d_model // n_head "
                                                         "(Switch-C: d_model 2080, 32 heads of 64)")
    d_ff: Optional[PositiveInt] = Field(None, description="MLP hidden width; default 4*d_model")
    n_ctx: PositiveInt = Field(2048, description="size of the position table: longest sequence the model accepts")
    vocab_size: PositiveInt = GPT2_VOCAB_SIZE
    type_vocab_size: PositiveInt = Field(2, description="token type (segment) embeddings of arch encoder (BERT: 2)")
    pos_embedding: Literal["learned", "sinusoidal", "relative"] = Field(
        "learned", description="'relative': T5's bucketed relative attention bias, one table per stack")
    sinusoidal_layout: Literal["interleaved", "concatenated"] = Field(
        "interleaved", description="'interleaved': the paper's sin on even, cos on odd channels; 'concatenated': "
                                   "all sines then all cosines (tensor2tensor, fairseq, Marian)")
    relative_buckets: PositiveInt = Field(32, description="relative position buckets (T5: 32)")
    relative_max_distance: PositiveInt = Field(128, description="distance where the last bucket starts (T5: 128)")
    attention: Literal["dense", "alternating"] = Field(
        "dense", description="'alternating': even layers dense causal, odd layers locally banded causal (GPT-3)")
    local_window: PositiveInt = Field(256, description="band width (tokens) of the locally banded layers")
    attention_scaling: bool = Field(True, description="divide attention scores by sqrt(d_kv); T5 does not (it "
                                                      "folds the factor into the query's initialisation)")
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_position: Literal["pre", "post"] = Field("pre", description="'post': Vaswani's norm after each residual add")
    activation: Literal["gelu", "gelu-exact", "relu", "gated-gelu"] = Field(
        "gelu", description="FFN: 'gelu' (tanh approximation, GPT-2), 'gelu-exact' (erf, BERT; Hugging Face's "
                            "'gelu'), 'relu' (Vaswani, T5 v1.0, Switch), 'gated-gelu' (T5 v1.1: gelu(x W0) * (x W1))")
    tie_embeddings: bool = Field(True, description="the output head is the token embedding")
    scale_embeddings: bool = Field(False, description="multiply token embeddings by sqrt(d_model) (Vaswani)")
    scale_decoder_output: bool = Field(False, description="multiply the decoder's output by d_model**-0.5 before "
                                                          "the tied head (T5 v1.0, Mesh TensorFlow)")
    decoder_start_token_id: int = Field(0, ge=0, description="the decoder's first input: targets are shifted right "
                                                             "behind it (T5: 0, the pad token)")
    init: Literal["gpt2", "t5", "bert"] = Field(
        "gpt2", description="'gpt2': N(0, init_std), residual projections / sqrt(2 n_layer); 't5': Mesh "
                            "TensorFlow's fan-in scaling, embeddings N(0, 1), queries also / sqrt(d_kv); "
                            "'bert' (arch encoder): N(0, init_std) for every matrix and table")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = True
    layer_norm_eps: PositiveFloat = 1e-5
    init_std: PositiveFloat = 0.02
    loss_chunk_tokens: int = Field(1024, ge=0, description="training's cross-entropy (arch decoder, encoder_decoder) "
                                                           "holds the logits of this many tokens at a time "
                                                           "(trainer/model/loss.py); 0: the whole micro batch's")
    moe: Optional[MoEConfig] = None

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.d_kv is None and self.d_model % self.n_head:
            raise ValueError(f"model.n_head: {self.n_head} heads do not divide model.d_model={self.d_model}")
        if self.arch == "encoder":
            self._check_encoder()
        else:
            self._refuse_encoder_options()
        if self.arch == "decoder":
            if self.pos_embedding == "relative":
                raise ValueError("model.pos_embedding: 'relative' needs model.arch: encoder_decoder")
            for key, gpt_value in _DECODER_ONLY_VALUES.items():
                if getattr(self, key) != gpt_value:
                    raise ValueError(f"model.{key}: {getattr(self, key)!r} needs model.arch: encoder_decoder "
                                     f"(the GPT decoder has {gpt_value!r})")
        elif self.arch == "encoder_decoder":
            self._check_encoder_decoder()
        if self.moe is not None and self.activation == "gated-gelu":
            raise ValueError("model.activation: gated-gelu experts are not supported (Switch experts use gelu or relu)")
        return self

    def _refuse_encoder_options(self) -> None:
        for key, used in (("type_vocab_size", self.type_vocab_size != 2),
                          ("activation", self.activation == "gelu-exact"), ("init", self.init == "bert")):
            if used:
                raise ValueError(f"model.{key}: {getattr(self, key)!r} needs model.arch: encoder")

    def _check_encoder(self) -> None:
        """What BERT's model file builds: learned positions, dense post-norm blocks, a tied GELU MLM head."""
        for key, allowed in _ENCODER_OPTIONS.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"model.{key}: {getattr(self, key)!r} is not supported with model.arch: encoder "
                                 f"(BERT: {' or '.join(map(repr, allowed))})")

    def _check_encoder_decoder(self) -> None:
        if self.pos_embedding == "learned":
            raise ValueError("model.pos_embedding: 'learned' is not supported with arch encoder_decoder "
                             "(sinusoidal: Vaswani; relative: T5)")
        if self.attention != "dense":
            raise ValueError("model.attention: the encoder-decoder has dense attention only")
        if self.decoder_start_token_id >= self.vocab_size:
            raise ValueError(f"model.decoder_start_token_id: {self.decoder_start_token_id} is not below "
                             f"model.vocab_size={self.vocab_size}")
        if self.scale_decoder_output and not self.tie_embeddings:
            raise ValueError("model.scale_decoder_output: needs model.tie_embeddings (it rescales for the tied head)")

    @property
    def head_dim(self) -> int:
        return self.d_kv or self.d_model // self.n_head

    @property
    def encoder_layers(self) -> int:
        return self.n_encoder_layer or self.n_layer

    @property
    def ff_width(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def expert_ff_width(self) -> int:
        return (self.moe.expert_d_ff if self.moe and self.moe.expert_d_ff else None) or self.ff_width

    def is_moe_layer(self, layer: int) -> bool:
        """Switch places a MoE FFN in every `every`-th block, starting with the second (layers 1, 3, ...)."""
        return self.moe is not None and (layer + 1) % self.moe.every == 0

    def expert_parallel_error(self, ep_size: int, dp_size: Optional[int] = None) -> Optional[str]:
        """Why `ep_size` ranks cannot share this model's experts over `dp_size` data-parallel ranks, or
        None. DeepSpeed MoE's rule: ep_size divides both the experts and the data-parallel size."""
        if self.moe is not None and self.moe.num_experts % ep_size:
            return f"{ep_size} does not divide model.moe.num_experts={self.moe.num_experts}"
        if dp_size is not None and dp_size % ep_size:
            return f"{ep_size} does not divide the data-parallel size {dp_size}"
        return None


# What the GPT decoder builds; an encoder_decoder-only option set to anything else on a decoder is an error.
_DECODER_ONLY_VALUES = dict(n_encoder_layer=None, attention_scaling=True, norm="layernorm", norm_position="pre",
                            tie_embeddings=True, scale_embeddings=False, scale_decoder_output=False, init="gpt2")
# What BERT (arch encoder) can build; anything else is an error naming the key.
_ENCODER_OPTIONS = dict(n_encoder_layer=(None,), pos_embedding=("learned",), attention=("dense",),
                        norm_position=("post",), tie_embeddings=(True,), scale_embeddings=(False,),
                        scale_decoder_output=(False,), decoder_start_token_id=(0,), moe=(None,),
                        activation=("gelu-exact", "gelu"), init=("bert", "gpt2"))
# The objective each architecture trains with.
OBJECTIVE_OF = {"decoder": "causal_lm", "encoder_decoder": "span_corruption", "encoder": "mlm_nsp"}


class DataConfig(Section):
    path: str = Field(..., description="a data output dir holding manifest.json (written by `pretrain data run`)")
    weights: Optional[dict[str, float]] = Field(None, description="source mixture weights; default: the manifest's")
    heldout_percent: float = Field(1.0, ge=0.0, lt=100.0, description="documents held out for `pretrain eval`, by key hash")
    on_corrupt: Literal["error", "skip"] = "error"
    num_workers: int = Field(0, ge=0, description="data loader worker processes per rank")
    max_epochs: PositiveFloat = Field(4.0, description="warn at start when this run would repeat a source more "
                                                       "often (GPT-3 saw Wikipedia 3.4 times)")


class SpanCorruptionConfig(Section):
    """T5's objective (Raffel et al. 2020, §3.1.4); the lengths follow from train.seq_len (trainer.span_corruption)."""

    noise_density: float = Field(0.15, gt=0.0, lt=1.0, description="share of each example's tokens corrupted")
    mean_noise_span_length: float = Field(3.0, ge=1.0, description="mean length (tokens) of a corrupted span")


class TrainConfig(Section):
    objective: Literal["causal_lm", "span_corruption", "mlm_nsp"] = Field(
        "causal_lm", description="causal_lm (arch decoder), span_corruption (encoder_decoder), mlm_nsp (encoder: "
                                 "BERT's masked LM and next-sentence prediction, trainer.masked_lm)")
    span_corruption: SpanCorruptionConfig = SpanCorruptionConfig()
    seq_len: PositiveInt = Field(2048, description="causal_lm: tokens per sequence; span_corruption: encoder "
                                                   "input length (T5: 512); mlm_nsp: positions per sequence, "
                                                   "[CLS] A [SEP] B [SEP] and padding (BERT: 128, then 512)")
    max_steps: PositiveInt = 100
    seed: int = Field(1234, ge=0, description="numpy seeds the shard order and span masks with it: non-negative")
    micro_batch_size: PositiveInt = 1
    global_batch_size: PositiveInt = Field(8, description="sequences per optimizer step, all ranks together")
    gradient_accumulation_steps: Optional[PositiveInt] = Field(None, description="default: derived from the batch sizes")
    lr: PositiveFloat = 6e-4
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="cosine decays to lr*min_lr_ratio (GPT-3: 10%)")
    warmup_tokens: int = Field(375_000_000, ge=0)
    decay_tokens: PositiveInt = 260_000_000_000
    batch_rampup_tokens: int = Field(0, ge=0, description="tokens over which the batch ramps up to full (0: off)")
    batch_rampup_start_tokens: PositiveInt = Field(32768, description="batch (tokens) at the start of the ramp")
    betas: tuple[float, float] = (0.9, 0.95)
    eps: PositiveFloat = 1e-8
    weight_decay: float = Field(0.1, ge=0.0)
    grad_clip: float = Field(1.0, ge=0.0)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    activation_checkpointing: bool = False
    compile: bool = Field(False, description="torch.compile each residual block (regional compilation, as "
                          "torchtitan); in a Switch block only the parts outside the router and experts, whose "
                          "shapes depend on the routing. ZeRO 0-2. Costs a compile at start-up (docs/benchmarks.md)")
    loss_spike_factor: PositiveFloat = Field(2.0, description="a loss above factor x running mean counts as a spike")
    loss_spike_patience: PositiveInt = Field(3, description="consecutive spikes that trigger a rollback")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        s = self.span_corruption
        if self.objective == "span_corruption" and (
                problem := span_corruption.settings_problem(self.seq_len, s.noise_density, s.mean_noise_span_length)):
            raise ValueError(f"train.span_corruption: {problem}")
        if self.objective == "mlm_nsp" and self.seq_len < masked_lm.MIN_SEQ_LEN:
            raise ValueError(f"train.seq_len: {self.seq_len} has no room for [CLS] A [SEP] B [SEP] "
                             f"(mlm_nsp needs at least {masked_lm.MIN_SEQ_LEN})")
        return self

    @property
    def tokens_per_sequence(self) -> int:
        """Tokens a sequence counts for in `tokens`, the schedules and the mixture shares: causal_lm, the
        seq_len it predicts; span_corruption, the raw tokens an example takes from the shards (568 for 512);
        mlm_nsp, the raw tokens an example takes (seq_len - 3: the positions but [CLS] and two [SEP])."""
        if self.objective == "causal_lm":
            return self.seq_len
        if self.objective == "mlm_nsp":
            return masked_lm.raw_tokens(self.seq_len)
        s = self.span_corruption
        return span_corruption.random_spans_lengths(self.seq_len, s.noise_density, s.mean_noise_span_length)[0]


class ParallelConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = 1
    ep_size: PositiveInt = Field(1, description="expert-parallel group size (MoE models)")
    data_parallel_size: Optional[PositiveInt] = Field(None, description="the number of processes; the launcher "
                                                      "sets it (RunConfig.for_world) when it saves the run's config")
    zero_hpz_partition_size: PositiveInt = Field(
        1, description="ZeRO++ hierarchical partitioning (ZeRO-3 only): a second copy of the 16-bit weights split "
                       "over this many ranks (a node's GPUs), so backward gathers stay inside the node; 1 = off")


class CheckpointConfig(Section):
    interval: PositiveInt = Field(1000, description="save every N optimizer steps")
    keep_last: PositiveInt = 3
    save_on_sigterm: bool = True


class LoggingConfig(Section):
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "pretrain"
    wandb_entity: Optional[str] = None
    run_name: Optional[str] = None
    log_interval: PositiveInt = 1
    sample_log: bool = Field(False, description="write RUN/samples/rank-R.jsonl: a hash of every micro-batch consumed")
    peak_flops: Optional[PositiveFloat] = Field(
        None, description="peak FLOP/s of one rank's device for MFU; default: the datasheet figure of a known GPU "
                          "(trainer.metrics.GPU_PEAKS), measured on CPUs and unknown GPUs")


class RunConfig(Section):
    """A whole training run: what `pretrain train` reads and saves as RUN/config.yaml."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig = TrainConfig()
    parallel: ParallelConfig = ParallelConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    cluster: Optional[dict[str, Any]] = Field(None, description="where the run was submitted, as the cluster "
                                              "tools resolved it (their schema); the trainer does not read it")

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        m, t, p = self.model, self.train, self.parallel
        if t.seq_len > m.n_ctx:
            raise ValueError(f"train.seq_len: {t.seq_len} is longer than the position table model.n_ctx={m.n_ctx}")
        if t.objective != OBJECTIVE_OF[m.arch]:
            raise ValueError(f"train.objective: {t.objective} does not train a model.arch {m.arch} (a decoder trains "
                             "with causal_lm, an encoder_decoder with span_corruption, an encoder with mlm_nsp)")
        if t.objective == "span_corruption" and m.vocab_size < SPAN_CORRUPTION_VOCAB_SIZE:
            raise ValueError(f"model.vocab_size: {m.vocab_size} has no room for span corruption's PAD and "
                             f"sentinels (ids {PAD}..{SPAN_CORRUPTION_VOCAB_SIZE - 1}, trainer.special_tokens): "
                             f"it needs at least {SPAN_CORRUPTION_VOCAB_SIZE}")
        if t.objective == "mlm_nsp" and m.vocab_size < BERT_VOCAB_SIZE:
            raise ValueError(f"model.vocab_size: {m.vocab_size} has no room for BERT's [CLS], [SEP] and [MASK] "
                             f"(ids {CLS}..{BERT_VOCAB_SIZE - 1}, trainer.special_tokens): it needs at least "
                             f"{BERT_VOCAB_SIZE}")
        if problem := m.expert_parallel_error(p.ep_size):
            raise ValueError(f"parallel.ep_size: {problem}")
        if p.zero_hpz_partition_size > 1 and p.zero_stage != 3:
            raise ValueError(f"parallel.zero_hpz_partition_size: {p.zero_hpz_partition_size} needs ZeRO-3 "
                             f"(parallel.zero_stage is {p.zero_stage}): it partitions ZeRO-3's weights a second time")
        if t.compile and p.zero_stage == 3:
            raise ValueError("train.compile: needs parallel.zero_stage 0-2 (it is 3): ZeRO-3 gathers and releases "
                             "each module's weights in hooks that a compiled block would trace")
        if m.moe is None and p.ep_size != 1:
            raise ValueError(f"parallel.ep_size: {p.ep_size} needs a MoE model (model.moe is not set)")
        if t.global_batch_size % t.micro_batch_size:
            raise ValueError(f"train.global_batch_size: {t.global_batch_size} is not a multiple of "
                             f"train.micro_batch_size={t.micro_batch_size}")
        if p.data_parallel_size is not None:
            self._check_layout(p.data_parallel_size)
        return self

    def _check_layout(self, dp_size: int) -> None:
        """The rules that need the number of data-parallel ranks."""
        m, p = self.model, self.parallel
        if m.moe is not None and p.zero_stage == 3:
            raise ValueError("parallel.zero_stage: ZeRO-3 with a MoE model is not supported: ZeRO-3 would partition "
                             "each rank's own experts over all data-parallel ranks and gather them back as if they "
                             "were replicas; use zero_stage 1 or 2 (experts are then sharded by parallel.ep_size)")
        if dp_size % p.zero_hpz_partition_size:
            raise ValueError(f"parallel.zero_hpz_partition_size: {p.zero_hpz_partition_size} does not divide the "
                             f"{dp_size} data-parallel ranks")
        if problem := m.expert_parallel_error(p.ep_size, dp_size):
            raise ValueError(f"parallel.ep_size: {problem}")
        self._accumulation(dp_size)

    def _accumulation(self, dp_size: int) -> int:
        t = self.train
        per_step = t.micro_batch_size * dp_size
        accum = t.gradient_accumulation_steps or t.global_batch_size // per_step
        if accum < 1 or accum * per_step != t.global_batch_size:
            raise ValueError(
                f"train.global_batch_size: {t.global_batch_size} != train.micro_batch_size ({t.micro_batch_size}) x "
                f"gradient accumulation ({accum}) x data-parallel size ({dp_size})")
        return accum

    @property
    def gradient_accumulation(self) -> int:
        """Micro-batches per rank in a full-batch step, once the layout is known (`for_world`)."""
        if self.parallel.data_parallel_size is None:
            raise TrainError("parallel.data_parallel_size: not set (start runs with `pretrain train CONFIG`)")
        return self._accumulation(self.parallel.data_parallel_size)

    def for_world(self, world: int) -> "RunConfig":
        """This run over `world` processes: a validated copy with parallel.data_parallel_size set.
        TrainError naming the key when the layout cannot run, or the config was saved for another world."""
        saved = self.parallel.data_parallel_size
        if saved is not None and saved != world:
            raise TrainError(f"parallel.data_parallel_size: {saved}, but {world} processes were started")
        if self.train.precision == "fp16" and not _has_gpu():  # this machine, not the file: not in the validator
            raise TrainError("train.precision: fp16 needs a GPU (DeepSpeed has no fp16 on CPU); use bf16 or fp32")
        data = self.model_dump()
        data["parallel"]["data_parallel_size"] = world
        try:
            return type(self).model_validate(data)
        except ValidationError as e:
            raise TrainError("; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())) from None


def _has_gpu() -> bool:
    import torch  # here: the schemas load without torch (`pretrain model info`, the planner)

    return torch.cuda.is_available()
