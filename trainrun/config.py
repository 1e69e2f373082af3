"""The config schema: typed dataclasses registered in Hydra's ConfigStore.

The root config is assembled here; a section whose module can be imported without torch keeps its dataclass and
its range checks next to the code that uses it (ScheduleConfig in schedule.py, LoggerConfig in logging.py) and is
re-exported from here. Every section's range checks are a `check()` in its module. Hydra merges every YAML file of
`configs/` into these types, so a misspelt key or a wrong type fails at composition
with the key's name. Ranges and cross-field rules are checked by `validate()` before
any data is loaded or any file is written.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from trainrun.checks import SectionChecks
from trainrun.errors import ConfigError
from trainrun.logging import LoggerConfig
from trainrun.schedule import ScheduleConfig


@dataclass
class ModelConfig:
    # User code: `_target_: pkg.module.factory` plus the factory's own keyword arguments (any keys; see
    # trainrun/usercode.py). Without it, `name` picks a built-in and only the keys below are allowed.
    _target_: Optional[str] = None
    name: str = "mlp"  # registry key: `trainrun-models` lists them
    hidden_sizes: List[int] = field(default_factory=lambda: [256, 128])  # mlp
    depth: int = 0  # mlp: if > 0, `depth` hidden layers all of width hidden_sizes[0] (deep-net studies)
    channels: List[int] = field(default_factory=lambda: [32, 64])  # cnn
    activation: str = "relu"  # mlp/cnn: relu | gelu | tanh | silu
    dropout: float = 0.0  # mlp/cnn: dropout before the classifier layers
    small_input: bool = True  # resnets: 3x3 stride-1 stem and no max-pool (inputs <= 64 px)
    patch_size: int = 4  # vit
    width: int = 192  # vit: embedding width (ViT-Tiny: 192)
    layers: int = 12  # vit: transformer blocks
    heads: int = 3  # vit: attention heads
    mlp_ratio: float = 4.0  # vit: MLP hidden = width * mlp_ratio
    arch: str = ""  # model=torchvision / model=timm: the zoo's model name (e.g. resnet18); its head fits the data
    pretrained: bool = False  # zoo models: the zoo's pretrained weights, from its local cache (never downloaded)
    weights: Optional[str] = None  # start from these weights: a trainrun run/checkpoint dir, a .pt state_dict or .safetensors
    weights_strict: bool = False  # refuse any mismatch but the replaced head's (missing, unexpected, other shapes)
    # gpt (decoder-only transformer; width/layers/heads/mlp_ratio above; context = data.block_size)
    norm: str = "layernorm"  # gpt: layernorm | rmsnorm
    positions: str = "learned"  # gpt: learned | rotary
    tie_weights: bool = True  # gpt: the output projection shares the token embedding's weight
    bias: bool = True  # gpt: biases in the Linear and LayerNorm layers
    hf_config: Dict[str, Any] = field(default_factory=dict)  # hf_causal_lm: transformers config keys (arch = model_type)


@dataclass
class InitConfig:
    # default | xavier_uniform | xavier_normal | kaiming_uniform | kaiming_normal | orthogonal | trunc_normal
    # | lsuv | gpt2 ; constant / zeros exist only to be refused with the symmetry explanation
    name: str = "default"
    std: float = 0.02  # trunc_normal / gpt2
    value: float = 0.0  # constant (refused)
    lsuv_target_var: float = 1.0  # lsuv: output variance each layer is scaled to
    lsuv_tol: float = 0.01  # lsuv: stop when |var - target| < tol
    lsuv_max_iters: int = 10  # lsuv: scaling iterations per layer
    zero_init_residual: bool = False  # zero the last norm of every residual branch (block starts as identity)
    zero_init_head: bool = False  # zero the classifier's weight and bias


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # sgd | adam | adamw | rmsprop | adagrad | nadam | radam | adafactor
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd, rmsprop
    nesterov: bool = False  # sgd
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # adam/adamw/nadam/radam
    eps: float = 1e-8
    alpha: float = 0.99  # rmsprop: smoothing constant of the squared-gradient average
    decoupled_weight_decay: bool = False  # nadam/radam: AdamW-style decay
    no_decay_norm_bias: bool = True  # weight decay 0 on norm weights, biases and embeddings
    lr_multipliers: Dict[str, float] = field(default_factory=dict)  # glob on parameter names -> LR factor
    scale_lr_with_batch: bool = False  # linear scaling rule: lr * global_batch / reference_batch_size
    reference_batch_size: int = 256


@dataclass
class PrecisionConfig:
    name: str = "fp32"  # fp32 | fp16 | bf16
    init_scale: float = 65536.0  # fp16 GradScaler
    growth_interval: int = 2000  # fp16 GradScaler
    allow_tf32: bool = True  # CUDA matmul/cudnn in tf32 when the precision is fp32
    grad_scaler: bool = True  # fp16: dynamic loss scaling (off only to study underflow: +fault=fp16_no_scaler)


@dataclass
class RegularizationConfig:
    label_smoothing: float = 0.0
    clip_grad_norm: Optional[float] = None  # clip by global L2 norm (the pre-clip norm is logged)
    clip_grad_value: Optional[float] = None  # clip each element to [-v, v]
    dropout: Optional[float] = None  # overrides model.dropout where the model has dropout
    loss: str = "ce"  # ce | focal
    focal_gamma: float = 2.0
    class_weights: Optional[List[float]] = None  # one weight per class
    balance_classes: bool = False  # class weights N / (K * n_c) from the training labels
    mixup_alpha: float = 0.0  # > 0 enables MixUp (Beta(alpha, alpha))
    cutmix_alpha: float = 0.0  # > 0 enables CutMix
    mix_prob: float = 1.0  # probability a batch is mixed at all
    switch_prob: float = 0.5  # with both on: probability of CutMix rather than MixUp
    random_erasing: float = 0.0  # probability a training image gets one erased rectangle
    stochastic_depth: float = 0.0  # drop probability of the last residual block (linear in depth)
    ema_decay: float = 0.0  # > 0 keeps an EMA of the weights, used for evaluation and saved in checkpoints
    ema_warmup: bool = True  # decay min(ema_decay, (1 + t) / (10 + t)) early on
    ema_every: int = 1  # update the EMA every N optimizer steps
    # none: ema_decay per update as given | reference: torchvision's (decay adjusted by global batch x ema_every /
    # epochs, the weights copied during the LR warmup); see trainrun.regularization.reference_ema_decay
    ema_adjust: str = "none"
    early_stopping_patience: int = 0  # evaluations without improvement of checkpoint.monitor; 0 = off
    early_stopping_min_delta: float = 0.0
    restore_best: bool = True  # on early stop, load the best weights before the final checkpoint


@dataclass
class CurriculumConfig:
    name: str = "off"  # off | loss | confidence | key | self_paced
    order: str = "easy_first"  # easy_first | hard_first (anti-curriculum)
    start_fraction: float = 0.2  # pacing: fraction = min(1, start + (1 - start) * epoch / pace_epochs)
    pace_epochs: int = 0  # 0 = the run's last epoch index (from the total steps, max_steps or epochs): full set by then
    random_fraction: float = 0.0  # mixed: this share of each epoch is drawn at random from the rest
    self_paced_threshold: float = 1.0  # self_paced: samples with loss below it are used
    self_paced_growth: float = 1.3  # self_paced: threshold multiplier per epoch


@dataclass
class DistillationConfig:
    name: str = "off"  # off | response | feature | self (teacher = the student's EMA)
    teacher: Optional[str] = None  # teacher run dir or checkpoint dir (SHA256-verified, weights_only)
    teacher_weights: str = "auto"  # auto (EMA if the checkpoint has it) | model | ema
    temperature: float = 4.0
    alpha: float = 0.5  # weight of the soft-target term; (1 - alpha) on the task loss
    feature_pairs: List[str] = field(default_factory=list)  # feature/hint KD: ["student_layer:teacher_layer", ...]
    feature_weight: float = 1.0  # weight of the hint (MSE) terms


@dataclass
class FinetuneConfig:
    """Which parameters train (trainrun/finetune.py): freezing, gradual unfreezing, layer-wise LR decay, LoRA."""
    name: str = "off"  # the preset this came from: off | full | linear_probe | gradual | layer_decay | lora
    freeze: List[str] = field(default_factory=list)  # parameter-name globs frozen ('*': all; '@head': the classifier)
    train: List[str] = field(default_factory=list)  # globs kept trainable although `freeze` matches them
    unfreeze_at: Dict[str, int] = field(default_factory=dict)  # glob -> epoch (or step) at which it starts training
    unfreeze_unit: str = "epoch"  # epoch | step: the unit of unfreeze_at
    freeze_bn: bool = True  # BatchNorm layers whose parameters are all frozen stay in eval mode (running stats kept)
    layer_decay: Optional[float] = None  # layer-wise LR decay (timm's semantics): layer i of L gets decay**(L-1-i)
    head_lr: Optional[float] = None  # the classifier's LR (before the schedule); null: optimizer.lr (x layer decay)
    lora_rank: int = 0  # > 0: LoRA adapters (peft) on the Linear/Conv2d modules lora_targets names; base frozen
    lora_alpha: float = 16.0  # LoRA scale alpha / rank
    lora_dropout: float = 0.0
    lora_targets: List[str] = field(default_factory=list)  # module-name globs; []: every Linear and Conv2d but the head


@dataclass
class DataConfig:
    _target_: Optional[str] = None  # user code: a factory returning train/val(/test) datasets or tensors
    name: str = "digits"  # digits | mnist5k | synthetic | tensors | cifar10 | imagefolder
    root: str = "data"  # cifar10 / imagefolder folder, or the .pt file of data=tensors
    download: bool = False  # cifar10
    batch_size: int = 64  # per-process micro-batch
    eval_batch_size: int = 512
    val_fraction: float = 0.2  # digits / mnist5k / synthetic / imagefolder without a val/ folder
    test_fraction: float = 0.0  # in-memory sets: a held-out test split nothing trains or selects on (mode=test)
    split_seed: int = 0  # the train/val split does not move with `seed`
    num_workers: int = 0  # DataLoader workers for image-file datasets
    persistent_workers: bool = True  # with num_workers > 0: keep the workers alive across epochs
    prefetch_factor: Optional[int] = None  # with num_workers > 0: batches each worker loads ahead (None: torch's 2)
    image_size: int = 32  # imagefolder: resize to this square size
    augment: bool = False  # random crop + horizontal flip; digits/mnist5k: crop only (a flipped digit is another glyph)
    limit_train: Optional[int] = None  # use only the first N training samples (smoke runs)
    limit_val: Optional[int] = None
    resize: Optional[int] = None  # digits / mnist5k / tensors: resize images to this square size (bilinear)
    # augmentation policies (torchvision.transforms.v2), training split only, with data.augment=true
    policy: str = "none"  # none | autoaugment | randaugment | trivialaugment | augmix
    autoaugment_policy: str = "imagenet"  # policy=autoaugment: imagenet | cifar10 | svhn
    randaugment_num_ops: int = 2  # policy=randaugment
    randaugment_magnitude: int = 9  # policy=randaugment
    augmix_severity: int = 3  # policy=augmix
    color_jitter: float = 0.0  # > 0: ColorJitter(brightness=contrast=saturation=v)
    crop_scale: List[float] = field(default_factory=lambda: [0.25, 1.0])  # RandomResizedCrop area range (image files)
    crop_ratio: List[float] = field(default_factory=lambda: [0.75, 4 / 3])  # RandomResizedCrop aspect-ratio range
    interpolation: str = "bilinear"  # bilinear | bicubic | nearest: resizes and crops of image files
    train_crop_size: Optional[int] = None  # image files: training crop size (default image_size)
    val_resize_size: Optional[int] = None  # image files: resize the short side to this before the centre crop
    val_crop_size: Optional[int] = None  # image files: evaluation centre-crop size (default image_size)
    mean: Optional[List[float]] = None  # normalisation (default: the dataset's own constants)
    std: Optional[List[float]] = None
    # text (data=text): token blocks for task=causal_lm
    block_size: int = 128  # text: tokens per training sequence (the model's context)
    tokenizer: str = "bytes"  # text: bytes (vocab 256) | bpe (trained locally with Hugging Face tokenizers)
    vocab_size: int = 512  # text, tokenizer=bpe: the BPE vocabulary size
    max_bytes: Optional[int] = None  # text: read at most this many bytes of the corpus (files in sorted order)
    cache_dir: Optional[str] = None  # text: where tokenised corpora are cached (default ~/.cache/trainrun/text)
    ra_reps: int = 1  # repeated augmentation: each sample k times per epoch, differently augmented (DeiT / torchvision)
    # synthetic: Gaussian class clusters, for tests and benchmarks
    num_samples: int = 1024
    num_classes: Optional[int] = None  # model outputs; default: inferred from the labels (synthetic: 10)
    input_shape: List[int] = field(default_factory=lambda: [1, 8, 8])


@dataclass
class TaskConfig:
    """What a batch's targets are, the loss and the metrics (trainrun/tasks)."""
    _target_: Optional[str] = None  # user code: a loss (nn.Module factory or function) or a whole trainrun Task
    name: str = "classification"  # classification | binary | multilabel | regression
    threshold: float = 0.5  # binary / multilabel: a logit's sigmoid above it is a positive prediction
    pos_weight: Optional[List[float]] = None  # binary / multilabel: BCE weight of positives (one, or one per label)
    loss: str = "mse"  # regression: mse | huber | l1
    huber_delta: float = 1.0  # regression, loss=huber
    ignore_index: int = -100  # causal_lm: target tokens with this id are not counted in the loss
    metrics: List[str] = field(default_factory=list)  # extra evaluation metrics (torchmetrics), e.g. [top5, f1_macro, ece]


@dataclass
class TrainerConfig:
    epochs: int = 15
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs when set
    stop_at_step: Optional[int] = None  # end this invocation after this step, checkpointed (resume continues)
    accumulation_steps: int = 1
    eval_every: int = 0  # optimizer steps; 0 = at the end of every epoch
    eval_at_start: bool = False  # also evaluate before the first step (logged at step 0: a fine-tune's starting point)
    ckpt_every: int = 0  # optimizer steps; 0 = at the end of every epoch
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: cuda means cuda:LOCAL_RANK)
    parallel: str = "ddp"  # under torchrun: ddp | fsdp2 (torch.distributed.fsdp.fully_shard)
    sync_batchnorm: bool = False  # under torchrun: convert BatchNorm to SyncBatchNorm
    compile: bool = False  # torch.compile the training/eval forward (checkpoints stay prefix-free)
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead | max-autotune
    activation_checkpointing: bool = False  # recompute each block's activations in backward (GPT, ViT, ResNets)
    channels_last: bool = False  # NHWC memory format for 4-D inputs and conv weights (faster convs on GPU/CPU)
    threads: Optional[int] = None  # torch intra-op CPU threads (torch.set_num_threads); null: torch's default
    profile: bool = False  # torch.profiler trace of a step window into RUN/profile (TensorBoard / Perfetto)
    profile_start: int = 3  # the window's first step, counted from this invocation's first step (>= 2)
    profile_steps: int = 5  # steps in the window


@dataclass
class CheckpointConfig:
    keep_last: int = 2  # newest checkpoints kept (the final one is always kept)
    keep_best: bool = True  # also keep the best checkpoint by `monitor`
    monitor: str = "val/acc"
    monitor_mode: str = "max"  # max | min
    keep_every_n_steps: int = 0  # > 0: also keep every checkpoint whose step is a multiple of it (milestones, forever)
    async_save: bool = False  # snapshot to host memory at the step boundary, write on a background thread
    format: str = "full"  # full (one state.pt) | sharded (FSDP2: each rank's shard via torch.distributed.checkpoint)


@dataclass
class LrFindConfig:
    start_lr: float = 1e-7
    end_lr: float = 10.0
    num_steps: int = 100
    smooth: float = 0.98  # exponential smoothing of the loss
    diverge: float = 4.0  # stop when the smoothed loss exceeds this multiple of its minimum


@dataclass
class DoctorConfig:
    nan_guard: str = "halt"  # halt | skip | off: non-finite inputs/loss/grad norm or labels out of range, every step
    # step: the guard reads each step's verdict before its update (a host sync per step); deferred: one step later,
    # the update undone if it was bad (no stall of a GPU's run-ahead); auto: deferred on CUDA where it applies
    guard_sync: str = "auto"  # auto | step | deferred (see docs/performance.md)
    max_consecutive_skips: int = 10  # nan_guard=skip: halt after this many bad steps in a row
    badstep_checkpoints: int = 3  # at most this many .badstep checkpoints per run
    min_loss_scale: float = 1.0  # fp16: a GradScaler scale below this is reported as a scale collapse
    detect_anomaly: bool = False  # torch.autograd.set_detect_anomaly (slow; names the backward op that made NaN)
    stats_every: int = 0  # optimizer steps between gradient/activation statistics (stats.jsonl); 0 = off
    overfit_steps: int = 300  # mode=overfit_batch: most steps on the one batch
    overfit_loss: float = 0.05  # mode=overfit_batch: passes when the batch's mean loss falls below this
    fault: str = "none"  # deliberate failure for teaching and tests (+fault=NAME): none | permuted_labels | no_zero_grad | reduction_sum
    inject_nan_step: int = 0  # tests/teaching: make `inject_nan_layer`'s output NaN at this optimizer step (1-based)
    inject_nan_layer: str = ""  # module name, as in model.named_modules()


@dataclass
class ExportConfig:
    format: str = "safetensors"  # safetensors | onnx | torch_export (mode=export)
    path: Optional[str] = None  # default RUN/export/model.<ext>
    atol: float = 1e-4  # parity bound: max abs difference between the export and the eager model on a real batch


@dataclass
class PredictConfig:
    split: str = "test"  # train | val | test (test falls back to val when the data has none, with a warning)
    output: Optional[str] = None  # default RUN/predictions.csv; .jsonl by suffix


@dataclass
class TrainrunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    init: InitConfig = field(default_factory=InitConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    regularization: RegularizationConfig = field(default_factory=RegularizationConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    lr_find: LrFindConfig = field(default_factory=LrFindConfig)
    doctor: DoctorConfig = field(default_factory=DoctorConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    # name -> {_target_: pkg.module.Callback, ...kwargs}: user callbacks (trainrun/callbacks.py); the name is the
    # key of the callback's state in checkpoints
    callbacks: Dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    mode: str = "train"  # train | eval | test | predict | export | generate | init_report | lr_find | overfit_batch
    resume: Optional[str] = None  # run dir, checkpoint dir, `latest`, or `auto` (continue run_name if it has a checkpoint, else start it)
    determinism: str = "warn"  # off | warn | error
    output_root: str = "runs"  # new run directories are created under it
    run_name: Optional[str] = None  # fixed run directory name (default: a timestamp)
    sweep_name: Optional[str] = None  # multirun: fixed sweep directory multirun/NAME (re-runs skip finished jobs)
    # mode=generate (a causal LM run): trainrun mode=generate resume=RUN prompt=... max_new_tokens=N
    prompt: str = ""
    max_new_tokens: int = 200
    temperature: float = 1.0  # 0: greedy
    top_k: Optional[int] = None


SEED_MAX = 2**63 - 1  # torch.manual_seed takes up to 2**64 - 1; the rank offset under torchrun stays below it


USER_CODE_SECTIONS = ("model", "data", "task")  # sections that may name user code with `_target_`


def schema() -> DictConfig:
    """The root schema as Hydra composes into it: the user-code sections take any keys (a `_target_` option
    carries its factory's own arguments); validate() refuses unknown keys in a section without `_target_`."""
    node = OmegaConf.structured(TrainrunConfig)
    for section in USER_CODE_SECTIONS:
        OmegaConf.set_struct(node[section], False)
    return node


def register_configs() -> None:
    ConfigStore.instance().store(name="trainrun_schema", node=schema())


# Choices of the sections config.py checks itself; each component module checks its own section's names (models,
# optimizers, schedules and datasets: the names registered in their registries).
CHOICES = {
    "determinism": ("off", "warn", "error"),
    "trainer.parallel": ("ddp", "fsdp2"),
    "trainer.compile_mode": ("default", "reduce-overhead", "max-autotune"),
}


def section_checks() -> Dict[str, Callable[[Any], None]]:
    """section -> the range checks of the module that owns it (imported here: they import torch)."""
    from trainrun import (checkpoint, distill, doctor, finetune, logging, models, optim, precision, regularization,
                          schedule, tasks)
    from trainrun.data import curriculum, datasets

    return {"model": models.check, "optimizer": optim.check, "schedule": schedule.check,
            "precision": precision.check, "regularization": regularization.check, "distillation": distill.check,
            "data": datasets.check, "logger": logging.check, "curriculum": curriculum.check,
            "checkpoint": checkpoint.check, "doctor": doctor.check, "task": tasks.check,
            "finetune": finetune.check}


def _check_known_keys(node: Any, schema: Any, prefix: str) -> None:
    """`+key=value` can add keys Hydra's struct mode would refuse; refuse them here with the valid names."""
    if not isinstance(node, DictConfig) or not isinstance(schema, DictConfig):
        return
    if isinstance(node, DictConfig) and node.get("_target_") is not None:
        return  # user code: its keyword arguments are the factory's business (it refuses unknown ones itself)
    for key in node.keys():
        if key not in schema:
            where = f" in {prefix[:-1]}" if prefix else ""
            raise ConfigError(f"unknown config key '{prefix}{key}': valid keys{where} are {', '.join(schema.keys())}")
        if OmegaConf.get_type(schema, key) is not dict:  # free-form maps (lr_multipliers, callbacks) take any key
            _check_known_keys(node[key], schema[key], f"{prefix}{key}.")


def _check_required_keys(node: Any, schema: Any, prefix: str) -> None:
    """`~key` deletes a key (and `key=???` leaves it unset) that the run cannot do without: refuse it here."""
    if not isinstance(node, DictConfig) or not isinstance(schema, DictConfig):
        return
    for key in schema.keys():
        if key not in node or OmegaConf.is_missing(node, key):
            default = OmegaConf.to_container(schema, resolve=False)[key]
            raise ConfigError(f"{prefix}{key} is missing (deleted with ~{prefix}{key}?) but every run needs it: "
                              f"drop the ~{prefix}{key} override, or set {prefix}{key}={default} (its default)")
        if OmegaConf.get_type(schema, key) is not dict:
            _check_required_keys(node[key], schema[key], f"{prefix}{key}.")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError (one line: the key, the value, the fix) on the first bad value."""
    schema = OmegaConf.structured(TrainrunConfig)
    _check_known_keys(cfg, schema, "")
    _check_required_keys(cfg, schema, "")
    for section, check in section_checks().items():
        check(cfg[section])
    checks = SectionChecks(cfg, "")
    for key, allowed in CHOICES.items():
        checks.one_of(key, allowed)
    from trainrun import init
    from trainrun.modes import MODES

    checks.one_of("mode", MODES.names())
    checks.one_of("init.name", (*init.INITS.names(), *init.REFUSED))
    checks.positive("trainer.epochs", "trainer.accumulation_steps", "trainer.max_steps", "trainer.stop_at_step",
                    "init.lsuv_target_var", "init.lsuv_tol", "init.lsuv_max_iters", "init.std", "lr_find.start_lr",
                    "lr_find.end_lr", "lr_find.num_steps", "lr_find.diverge", "trainer.threads",
                    "trainer.profile_steps")
    if cfg.trainer.profile_start < 2:
        checks.fail("trainer.profile_start", "the profiler needs one warm-up step before its window: use >= 2")
    checks.positive("trainer.eval_every", "trainer.ckpt_every", allow_zero=True)
    checks.unit("lr_find.smooth")
    if cfg.init.name in ("constant", "zeros"):
        checks.fail("init.name", "a constant initialisation gives every unit of a layer the same output and the same "
                                 "gradient, so the units stay identical forever (the symmetry problem); use "
                                 "init=kaiming_normal for ReLU nets or init=xavier_uniform for tanh/linear ones")
    if cfg.lr_find.end_lr <= cfg.lr_find.start_lr:
        checks.fail("lr_find.end_lr", f"must be larger than lr_find.start_lr={cfg.lr_find.start_lr}")
    if cfg.mode == "overfit_batch" and cfg.resume:
        checks.fail("resume", "mode=overfit_batch starts from a fresh model; drop resume=")
    if cfg.mode == "generate":
        _check_generate(cfg, checks)
    device = str(cfg.trainer.device)
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        checks.fail("trainer.device", "must be auto, cpu, cuda or cuda:N")
    _check_across_sections(cfg, checks)


def _check_across_sections(cfg: DictConfig, checks: SectionChecks) -> None:
    """Rules that span sections, and values that pass the type check but would crash or silently mislead later:
    seeds RNGs cannot take, a monitored metric that evaluation never logs."""
    from trainrun.loop import eval_metric_names
    from trainrun.tasks import metric_names as task_metric_names

    if cfg.distillation.name == "self" and cfg.regularization.ema_decay <= 0:
        checks.fail("distillation.name", "self-distillation uses the student's EMA as teacher: set "
                                         "regularization.ema_decay (e.g. 0.999)")
    if not 0 <= cfg.seed <= SEED_MAX:
        checks.fail("seed", "must be an integer in [0, 2**63 - 1] (what torch.manual_seed takes), e.g. seed=0")
    _check_task_fits(cfg, checks)
    if (cfg.model.get("pretrained") or cfg.model.get("weights")) and \
            (cfg.init.name != "default" or cfg.init.zero_init_residual or cfg.init.zero_init_head):
        checks.fail("init.name", "would overwrite the starting weights (model.pretrained / model.weights are loaded "
                                 "after the init): use init=default with them")
    names = eval_metric_names(cfg.regularization.ema_decay > 0, task_metric_names(cfg))
    if cfg.checkpoint.monitor not in names:
        checks.fail("checkpoint.monitor", f"evaluation logs only {', '.join(names)}"
                                          + ("" if cfg.regularization.ema_decay > 0 else
                                             " (val_raw/* exists with regularization.ema_decay > 0)")
                                          + _more_metrics(cfg)
                                          + "; the best checkpoint and early stopping would never see this metric")


MAX_NEW_TOKENS = 100_000


def _check_generate(cfg: DictConfig, checks: SectionChecks) -> None:
    if not cfg.resume:
        checks.fail("resume", "mode=generate samples from a trained causal LM: resume=<run dir or checkpoint dir>")
    if not 1 <= cfg.max_new_tokens <= MAX_NEW_TOKENS:
        checks.fail("max_new_tokens", f"must be in [1, {MAX_NEW_TOKENS:,}]")
    if not 0 <= cfg.temperature < float("inf"):
        checks.fail("temperature", "must be >= 0 and finite (0: always the most likely token)")
    if cfg.top_k is not None and cfg.top_k < 1:
        checks.fail("top_k", "must be >= 1, or null for the whole vocabulary")


def _more_metrics(cfg: DictConfig) -> str:
    """The hint that task.metrics logs more (e.g. ' (more with task.metrics=[top5, f1_macro, ...])')."""
    from trainrun.metrics import EXTRAS

    extras = EXTRAS.get(cfg.task.name) if cfg.task.get("_target_") is None else None
    return f" (more with task.metrics=[{', '.join(extras)}])" if extras else ""


# Techniques that read class-index targets: a task whose targets are not class indices refuses them.
CLASS_INDEX_ONLY = {"regularization.label_smoothing": 0.0, "regularization.mixup_alpha": 0.0,
                    "regularization.cutmix_alpha": 0.0, "regularization.class_weights": None,
                    "regularization.balance_classes": False, "regularization.loss": "ce",
                    "distillation.name": "off", "curriculum.name": "off"}


def _check_task_fits(cfg: DictConfig, checks: SectionChecks) -> None:
    from trainrun.tasks.build import task_classifies

    if cfg.data.get("_target_") is None and cfg.data.name == "text" and cfg.task.get("_target_") is None \
            and cfg.task.name != "causal_lm":
        checks.fail("task.name", "data=text gives token blocks for language modelling: use task=causal_lm (with "
                                 "model=gpt or model=hf_causal_lm)")
    if task_classifies(cfg.task):
        return
    for key, off in CLASS_INDEX_ONLY.items():
        value = OmegaConf.select(cfg, key)
        if value != off:
            checks.fail(key, f"works on class-index targets, but task={cfg.task.name} has other targets; drop it "
                             f"({key}={'null' if off is None else str(off).lower() if isinstance(off, bool) else off}) "
                             "or use task=classification")
