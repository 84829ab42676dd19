"""Default config of ``python -m experiments.imagenet_vgg``: the authors' VGG-16 workflow.

    python -m experiments.imagenet_vgg --workdir runs/vgg --config.weights=vgg16-397923af.pth \\
        --config.data_dir=/data/tfds

imports torchvision's VGG-16, decomposes it with the authors' ranks (3.06x fewer conv
multiply-adds), evaluates both nets on the 50,000 validation images, fine-tunes the low-rank net
with the authors' recipe (SGD lr 0.01, x0.1 every 50k iterations, 120k iterations at batch 64,
momentum 0.9, weight decay 5e-4; the learning rate scales linearly with the batch) and times both.
The authors report top-5 90.60% (VGG-16) and 90.31% (low-rank) after fine-tuning.
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "decompose"  # decompose pretrained weights, or "scratch": low-rank + BN from scratch
    c.model = "vgg16"  # zoo family: vgg16, caffenet (scratch), alexnet (torchvision weights)
    c.lowrank = False  # set by the stages: the fine-tuned / scratch-trained net is low-rank
    c.bn = False
    c.model_kwargs = ml_collections.FieldReference(None, field_type=dict)  # e.g. small widths
    c.weights = ml_collections.FieldReference(None, field_type=str)  # .pth/.safetensors/.h5
    c.rank_rule = "vgg16"  # authors' ranks, a JSON file, energy:F, speedup:S, ...+measured
    c.rank_multiple = ml_collections.FieldReference(None, field_type=int)  # round ranks
    c.stages = "import,decompose,evaluate,finetune,time"

    c.dataset = "imagenet2012"
    c.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data_dir
    c.download = True  # TFDS prepares ImageNet from the manual download
    c.image_size = 224
    c.resize = 256  # short side before cropping
    c.normalisation = "torchvision"  # torchvision (RGB, mean/std) | caffe | keras (BGR - mean)
    c.scale_augment = False  # random-area crops instead of random 224 crops of the 256 image

    c.batch_size = 64
    c.eval_batch_size = 250
    c.steps_per_epoch = 10_000  # an "epoch" here is 10k iterations
    c.num_epochs = 12  # 120k iterations
    c.lr_values = (0.01, 0.001, 0.0001)  # at batch 64; scaled by batch_size / 64 (linear rule)
    c.lr_reference_batch = ml_collections.FieldReference(64, field_type=int)  # None: no scaling
    c.lr_boundaries_epochs = (5, 10)  # x0.1 every 50k iterations
    c.momentum = 0.9
    c.reset_momentum = False
    c.weight_decay = 5e-4
    c.bn_momentum = 0.9
    c.dtype = "bfloat16"  # compute dtype on accelerators; use float32 on CPU
    c.seed = 0
    c.augment = True
    c.ranks = ml_collections.FieldReference(None, field_type=dict)

    c.log_every_steps = 200
    c.checkpoint_every_epochs = 1
    c.keep_checkpoints = 2
    c.progress = True
    c.multihost = False  # several processes (hosts): jax.distributed first
    c.coordinator_address = ""  # 'host:port' of process 0; '': JAX's cluster detection
    c.num_processes = 0  # with coordinator_address: how many processes
    c.process_id = -1  # with coordinator_address: this process's index
    c.heartbeat_timeout_seconds = 100  # a silent process is declared dead after this
    c.time_batch = 32  # the authors timed VGG-16 at batch 32
    c.time_repeats = 10

    if variant == "scratch":  # the authors' CaffeNet-with-BN recipe, from scratch
        c.mode = "scratch"
        c.model = "caffenet"
        c.image_size = 227
        c.batch_size = 256
        c.lr_values = (0.1, 0.01, 0.001, 0.0001)  # given at batch 256: no scaling
        c.lr_reference_batch = None
        c.lr_boundaries_epochs = (10, 20, 30)
        c.num_epochs = 35
        c.steps_per_epoch = 5_000
        c.weight_decay = 1e-4
        c.normalisation = "caffe"
    elif variant == "tiny":  # smoke tests and debugging: seconds on a CPU
        c.model_kwargs = {"widths": ((4, 4), (8, 8), (8, 8, 8), (8, 8, 8), (8, 8, 8)),
                          "fc_features": 16}
        c.rank_rule = "speedup:2.0"
        c.image_size = 32
        c.resize = 36
        c.batch_size = 4
        c.eval_batch_size = 4
        c.steps_per_epoch = 2
        c.num_epochs = 1
        c.lr_boundaries_epochs = (1, 2)
        c.dtype = "float32"
        c.time_batch = 2
        c.time_repeats = 1
        c.log_every_steps = 1
        c.progress = False
    elif variant:
        raise ValueError(f"unknown config variant {variant!r}; use '', 'scratch' or 'tiny'")
    return c
