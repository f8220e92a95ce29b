"""Training configuration: one dataclass, stored in checkpoints as a dict, rebuilt with
`TrainConfig(**d)`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class TrainConfig:
    backbone: str = "unet"  # registered backbone name
    backbone_opts: dict = field(default_factory=dict)  # options for the backbone factory
    dataset: str = "celeba"  # registered dataset name
    dataset_opts: dict = field(default_factory=dict)  # options for the dataset factory
    path: str = "linear"  # registered probability path name
    path_opts: dict = field(default_factory=dict)  # options for the path factory
    data_dir: str = "./data"  # dataset root (celeba downloads into DATA_DIR/celeba)
    image_size: int = 64  # training resolution (square)
    channels: int = 3  # image channels
    batch_size: int = 32  # images per optimizer step, over all processes (global batch)
    grad_accum: int = 1  # micro-batches accumulated per optimizer step (per process)
    epochs: int = 50  # passes over the data (ignored when max_steps is set)
    max_steps: int | None = None  # stop after this many optimizer steps (None: use epochs)
    lr: float = 3e-4  # AdamW learning rate after warm-up (see docs/training.md for why)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 0  # linear learning-rate warm-up from 0 (0: none)
    grad_clip: float | None = 1.0  # max global gradient norm (None: no clipping)
    ema_decay: float = 0.9999  # target EMA decay
    ema_warmup: float = 10.0  # update n uses min(ema_decay, n / (n + ema_warmup)); 0: no ramp
    time_sampling: str = "uniform"  # training times: uniform, logit_normal or edm
    time_loc: float = 0.0  # logit_normal location (0: centred on t = 0.5)
    time_scale: float = 1.0  # logit_normal scale
    save_every: int | None = 10  # checkpoint every N epochs (None: off)
    sample_every: int | None = 5  # sample grid every N epochs (None: off)
    save_every_steps: int | None = None  # checkpoint every N steps (None: off)
    sample_every_steps: int | None = None  # sample grid every N steps (None: off)
    num_samples: int = 64  # images in each sample grid
    sample_steps: int = 100  # Euler steps for grids
    log_every: int = 50  # steps between metrics.jsonl lines
    output: str = "results"  # run directory
    seed: int = 0  # seeds data order, noise, times and initialisation
    device: str = "auto"  # auto, cpu or cuda
    num_workers: int | None = None  # DataLoader workers (None: 0 on the CPU, up to 8 per GPU)
    cache_dataset: bool = True  # decode image files once into a prepared array in $FMKIT_CACHE
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16
    compile: bool = False  # torch.compile the backbone for training
    channels_last: bool | None = None  # NHWC memory format (None: on CUDA only)
    fused_adamw: bool | None = None  # one-kernel AdamW (None: on CUDA only)
    dist_timeout: float = 600.0  # seconds a rank waits for the others before failing

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)
