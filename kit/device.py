"""Where and in which precision the model runs: one device choice for every script.

    device = pick_device("auto")                   # cuda when this machine has one, else cpu
    with autocast(device, amp_dtype(device, "auto")):
        logits = model(to_device(images, device))  # uint8 NHWC batch, moved without waiting for the host
"""
from contextlib import nullcontext

import torch

from kit.common import UserError


def pick_device(name="auto"):
    """--device as a torch.device; auto is cuda when this machine has one. A name torch does not know
    (gpu0) or a GPU this machine lacks is one line listing the valid names."""
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if name == "auto":
        return torch.device("cuda" if gpus else "cpu")
    valid = ["auto", "cpu", *(["cuda"] if gpus else []), *gpus]
    if name not in valid:
        raise UserError(f"--device {name} is not a device of this machine; valid: {', '.join(valid)}")
    return torch.device(name)


def amp_dtype(device, amp="auto"):
    """Autocast dtype: bf16 where the hardware runs it fast (recent GPUs, AVX512-BF16/AMX CPUs),
    fp16 on older GPUs, None (fp32) otherwise or with amp='off'."""
    if amp != "auto":
        return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and torch.cpu._is_avx512_bf16_supported() else None


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def to_device(images, device, channels_last=True):
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def out_of_memory(batch_size, valid_batch_size, accum_steps, name, input_size):
    """The one-line advice for CUDA out of memory: half the batch, twice the accumulation (same images a step)."""
    return UserError(f"out of memory with --batch_size {batch_size} (--valid_batch_size {valid_batch_size}) for "
                     f"{name} at {input_size[1]}x{input_size[2]}: start a new run with --batch_size "
                     f"{max(2, batch_size // 2)} --accum_steps {accum_steps * 2} (the same images per optimizer "
                     "step), or a smaller --resize")
