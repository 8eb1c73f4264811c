"""The numbers of PSPNet's training recipe and the Settings of a run, without TensorFlow (train.py's --help
shows them).

Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017, §4 and §5.1, and the
authors' re-implementation hszhao/semseg (config/*/*_pspnet*.yaml,
util/transform.py, model/pspnet.py, tool/train.py).
"""

import dataclasses

from pspnet_keras import models

# Paper §4: "poly" policy with base learning rate 0.01 and power 0.9, momentum 0.9,
# weight decay 0.0001, batch size 16.
BASE_LR = 0.01
POLY_POWER = 0.9
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
BATCH_SIZE = 16
# Paper §4: 150K iterations on ImageNet scene parsing (ADE20K), 30K on PASCAL VOC and
# 90K on Cityscapes; a user's own data gets the VOC setting.
ITERATIONS = {"ade20k": 150_000, "voc2012": 30_000, "cityscapes": 90_000, "folders": 30_000}
# Paper §3.4 and §5.1: the auxiliary loss on res4b22 (stage 4's last block) weighs 0.4.
AUX_WEIGHT = 0.4
# hszhao/semseg tool/train.py: the new modules (pyramid, classifier, auxiliary head) at 10x.
HEAD_LR_MULTIPLIER = 10.0
# The released model of each benchmark, where fine-tuning starts by default.
INIT_MODELS = {
    "ade20k": "pspnet50_ade20k",
    "voc2012": "pspnet101_voc2012",
    "cityscapes": "pspnet101_cityscapes",
    "folders": models.DEFAULT_MODEL,
}

# Augmentation (paper §4; util/transform.py with the configs' scale_min/max, rotate_min/max).
SCALE_RANGE = (0.5, 2.0)
ROTATION_DEGREES = 10.0
BLUR_PROBABILITY = 0.5
MIRROR_PROBABILITY = 0.5
# RandomGaussianBlur(radius=5): cv2.GaussianBlur(image, (5, 5), 0), whose kernel for 5
# taps and sigma 0 is OpenCV's fixed binomial one (getGaussianKernel), in rows and columns.
BLUR_KERNEL = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)


@dataclasses.dataclass
class Settings:
    """What a run trains: the recipe's hyper-parameters and the run's bookkeeping intervals."""

    iterations: int
    batch: int
    crop_size: int
    lr: float = BASE_LR
    momentum: float = MOMENTUM
    weight_decay: float = WEIGHT_DECAY
    power: float = POLY_POWER
    aux_weight: float = AUX_WEIGHT
    head_lr_mult: float = HEAD_LR_MULTIPLIER
    train_bn: bool = False
    seed: int = 0
    precision: str = "float32"
    val_every: int = 0
    checkpoint_every: int = 1000
