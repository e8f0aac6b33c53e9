"""Constants shared by data processing, the model and inference (values as in LLaVA / MoE-LLaVA)."""

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200

DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
IMAGE_PLACEHOLDER = "<image-placeholder>"

# At most this many images are kept per sample (more is an error in the dataset, not a silent cut).
MAX_IMAGE_LENGTH = 16

LOGDIR = "."
