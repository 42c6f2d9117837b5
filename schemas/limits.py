"""Size ceilings of the wire format, enforced by schemas/ and published in the JSON Schemas.

They bound work and memory per message (invariant 6). Pixel, sample, frame and token limits
after decoding belong to the worker's settings; these are the structural caps before that.
"""

from typing import Final

#: Default cap on one raw request message; `parse_request(max_bytes=...)` overrides it.
#: Kafka's own default (message.max.bytes) is about 1 MiB, so brokers usually cut first.
MAX_REQUEST_BYTES: Final = 16 * 1024 * 1024

MAX_ID_CHARS: Final = 256
MAX_MODEL_CHARS: Final = 128
#: Characters of one text field; token truncation to the model's length happens later.
MAX_TEXT_CHARS: Final = 100_000
#: Base64 characters of one image, audio file, video file or video frame (about 6 MiB decoded):
#: the byte limit checked before any decoder sees the file.
MAX_MEDIA_B64_CHARS: Final = 8 * 1024 * 1024
#: Samples of a raw audio array (60 s at 16 kHz).
MAX_AUDIO_SAMPLES: Final = 960_000
MIN_SAMPLING_RATE: Final = 1_000
MAX_SAMPLING_RATE: Final = 384_000
MAX_VIDEO_FRAMES: Final = 64
MAX_CANDIDATE_LABELS: Final = 64
MAX_LABEL_CHARS: Final = 256
MAX_PARAMETERS: Final = 32
MAX_PARAMETER_NAME_CHARS: Final = 64
MAX_PARAMETER_STRING_CHARS: Final = 1_024
MAX_PARAMETER_LIST_ITEMS: Final = 256
#: Open Inference Protocol tensors: count per request, rank, and elements per tensor.
MAX_TENSORS: Final = 16
MAX_TENSOR_RANK: Final = 8
MAX_TENSOR_ELEMENTS: Final = 1_048_576
MAX_TENSOR_NAME_CHARS: Final = 128
